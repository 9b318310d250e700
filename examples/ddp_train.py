"""Perforated Backpropagation with DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py                  # CPU processes, gloo
    torchrun --nproc_per_node=8 examples/ddp_train.py --backend nccl   # one GPU per process
    python examples/ddp_train.py                                       # one process, same result

Trains an MLP on scikit-learn's digits (``pip install apical[data]``) with dendrites. Every rank
trains on its share of each global batch (DistributedSampler); the global batch, and so the
training, is the same for any number of processes: ``--batch-size`` is the global batch size. The
only apical-specific lines are marked ``# apical``: the Controller is created on the plain module,
the model is wrapped with ``apical.distributed.wrap``, and after a restructure DDP and the
optimiser are rebuilt. Multi-node: add ``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint`` to
torchrun as usual; nothing changes here.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import apical
import apical.datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--epochs", type=int, default=200, help="epoch budget (the cycle usually ends first)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (split over the ranks)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--checkpoint", default=None, help="write a checkpoint here after every epoch (rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group(args.backend)
    rank, world = apical.distributed.rank(), apical.distributed.world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    main_process = apical.distributed.is_main_process()

    split = apical.datasets.load("digits", seed=args.seed)
    train = TensorDataset(split.x_train, split.y_train)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)  # equal shares: exact single-process equivalence
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    x_val, y_val = split.x_val.to(device), split.y_val.to(device)
    x_val, y_val = x_val[rank::world], y_val[rank::world]  # each rank scores its share

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(split.x_train.shape[1], args.width), nn.ReLU(),
                          nn.Linear(args.width, args.width), nn.ReLU(), nn.Linear(args.width, 10)).to(device)
    cfg = apical.DendriteConfig(mode="pb", max_dendrites=2, patience=5, max_dendrite_epochs=10, seed=args.seed)
    apical.perforate(model, cfg)                                        # apical
    ctl = apical.Controller(model, cfg, maximize=True)                  # apical: on the plain module
    ddp_kwargs = {"device_ids": [local_rank]} if args.backend == "nccl" else {}
    net = apical.distributed.wrap(model, **ddp_kwargs) if distributed else model  # apical
    opt = torch.optim.Adam(ctl.parameters(), lr=args.lr)

    start = time.perf_counter()
    if main_process:
        print(f"{world} process(es), backend {args.backend if distributed else 'none'}, device {device}, "
              f"global batch {args.batch_size}, {len(train)} training rows", flush=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        net.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():  # global accuracy: correct and total summed over ranks
            counts = torch.tensor([(model(x_val).argmax(1) == y_val).sum().item(), len(y_val)],
                                  dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(counts)
        score = (counts[0] / counts[1]).item()
        step = ctl.step(score)                                          # apical: same decision on all ranks
        if main_process:
            print(f"epoch {step.epoch:3d}  {step.phase:8s} val_acc {score:.4f}  dendrites {step.dendrites}  "
                  f"{step.event}  ({time.perf_counter() - start:.1f} s)", flush=True)
        if step.done:
            break
        if step.restructured:                                           # apical
            if distributed:
                net = apical.distributed.rewrap(net, **ddp_kwargs)
            opt = torch.optim.Adam(ctl.parameters(), lr=args.lr)
        if args.checkpoint:
            apical.distributed.save_on_main(args.checkpoint, model, ctl, opt, extra={"epoch": epoch + 1})
    else:
        ctl.finish()

    model.eval()
    with torch.no_grad():
        test = (model(split.x_test.to(device)).argmax(1) == split.y_test.to(device)).float().mean().item()
    if main_process:
        print(f"done: {apical.dendrite_count(model)} dendrite set(s), {apical.parameter_count(model)} parameters, "
              f"test accuracy {test:.4f}, {ctl.epoch} epochs in {time.perf_counter() - start:.1f} s", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
