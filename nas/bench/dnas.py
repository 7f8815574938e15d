"""`nas bench dnas`: the DNAS supernet's overhead and search quality, measured in one run.

1. Step time of the supernet's weight step and theta step (hard and soft mode) over the
   float model's, same model and batch; and memory: on CUDA the peak allocated, on the CPU
   the distinct tensors autograd keeps for the backward pass plus the parameters (the part
   of training memory the supernet changes).
2. Three size targets: each derived plan's size and one-shot accuracy, beside uniform W8A8,
   W4A8 and W2A8 plans evaluated on the same supernet.
3. DNAS against random plans of (nearly) equal size on the middle target's supernet, and the
   DNAS plan against the best random plan on the test split, which neither selection saw.
4. Data-parallel scaling: steps per second of the same search on one worker (in process)
   and on N Ray Train workers (gloo, CPU), one CPU and torch thread each; and the time of the
   communication a step makes, measured alone on the workers.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from nas.budget import Budget
from nas.cost import make_cost_model
from nas.cost.targets import Target
from nas.data import make_loader
from nas.search.base import SearchBudget, SearchProblem
from nas.search.dnas import DnasConfig, derive, one_shot_accuracy, search
from nas.search.random import RandomSearcher
from nas.search.uniform import uniform_indices
from nas.spaces import Choice
from nas.supernet import Supernet
from nas.train import to_device


def _theta_step(net: Supernet):
    """One architecture step: gradients for theta only, as the search takes it."""
    theta = net.arch_parameters()
    opt = torch.optim.Adam(theta, lr=0.01)

    def step(loss):
        for p, g in zip(theta, torch.autograd.grad(loss, theta)):
            p.grad = g
        opt.step()
    return step


def _weight_step(model: nn.Module):
    """One SGD step on every trainable weight (theta frozen by the caller)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

    def step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _memory_bytes(model: nn.Module, x, y, device, step) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(nn.functional.cross_entropy(model(x), y))
        return torch.cuda.max_memory_allocated()
    saved: dict[int, int] = {}

    def pack(t):
        # A tensor saved by several ops (a ReLU's output, kept by the ReLU and the next conv)
        # occupies memory once.
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    step(loss)
    return sum(saved.values()) + sum(p.numel() * p.element_size() for p in model.parameters())


# (row name, supernet mode, which step): the weight step freezes theta, so each layer computes
# one plain branch in hard mode; the theta step computes the gradient for theta.
STEPS = (("hard weight step", "hard", "weights"), ("hard theta step", "hard", "theta"),
         ("soft weight step", "soft", "weights"), ("soft theta step", "soft", "theta"))


def overhead(space, model, splits, device, batch_size: int, steps: int) -> dict[str, Any]:
    """Median step time and memory of each STEPS row against the float model's. The steps
    are interleaved (one of each per round), so drift in the machine's speed hits every row
    alike instead of biasing the ratios."""
    x, y = next(iter(make_loader(splits.train, batch_size, shuffle=True, seed=0)))
    x, y = to_device(x, device), y.to(device)
    fp = model.to(device, memory_format=torch.channels_last).train()
    subjects = {"float model": (fp, _weight_step)}
    for name, mode, which in STEPS:
        net = Supernet(model, space, mode=mode, tau=1.0).to(device,
                                                             memory_format=torch.channels_last)
        net.train()
        subjects[name] = (net, _theta_step if which == "theta" else _weight_step)
    steppers = {name: (net, make(net)) for name, (net, make) in subjects.items()}
    times: dict[str, list[float]] = {name: [] for name in subjects}
    for round_ in range(steps + 3):
        for name, (net, step) in steppers.items():
            _set_theta(net, name)
            start = time.perf_counter()
            step(nn.functional.cross_entropy(net(x), y))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 3:  # warm-up rounds excluded
                times[name].append(time.perf_counter() - start)
    results = {"batch_size": batch_size, "steps": steps, "rows": {}}
    for name, (net, make) in subjects.items():
        _set_theta(net, name)
        results["rows"][name] = {"step_s": statistics.median(times[name]),
                                 "memory": _memory_bytes(net, x, y, device, make(net))}
    fp_row = results["rows"].pop("float model")
    results["fp_step_s"], results["fp_memory"] = fp_row["step_s"], fp_row["memory"]
    for row in results["rows"].values():
        row["step_ratio"] = row["step_s"] / results["fp_step_s"]
        row["memory_ratio"] = row["memory"] / results["fp_memory"]
    results["memory_measure"] = ("cuda max_memory_allocated" if device.type == "cuda" else
                                 "distinct storages saved for backward + parameters")
    return results


def state_save(space, net: Supernet, optim_state: dict, state, repeats: int = 5,
               folder: str | None = None) -> dict[str, Any]:
    """Cost of the search's periodic save (supernet.pt, written atomically and fsynced) on
    the step time: the median save time over the steps between two saves, SAVE_STEPS or
    SAVE_SECONDS' worth at this search's mean step time, whichever is fewer. Written to a
    temporary folder under `folder` (default: the system's)."""
    import tempfile
    from pathlib import Path

    from nas.runs import save_checkpoint
    from nas.search.dnas import SAVE_SECONDS, SAVE_STEPS
    from nas.search.supernet_file import supernet_payload

    step_s = state.elapsed / max(1, state.step)
    times = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            payload = supernet_payload(space, net, seed=0, factored=False, created="",
                                       optimizers=optim_state,
                                       search_state={"step": state.step,
                                                     "elapsed": state.elapsed, "history": []})
            payload["rng"] = torch.get_rng_state()
            save_checkpoint(Path(tmp) / "supernet.pt", payload)
            times.append(time.perf_counter() - start)
        size = (Path(tmp) / "supernet.pt").stat().st_size
    save_s = statistics.median(times)
    steps_between = max(1, min(SAVE_STEPS, int(SAVE_SECONDS / max(step_s, 1e-9))))
    return {"save_s": save_s, "bytes": size, "step_s": step_s, "steps_between": steps_between,
            "overhead": save_s / (steps_between * step_s), "repeats": repeats}


def _set_theta(net: nn.Module, name: str) -> None:
    """The theta step trains theta; every other row keeps it frozen."""
    if isinstance(net, Supernet):
        net.train_theta("theta" in name)


def run_bench(space, model, splits, device, fractions: tuple[float, ...], budget: Budget,
              samples: int, random_plans: int, seed: int, batch_size: int,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {"overhead": overhead(space, model, splits, device, batch_size, 20)}
    for name, row in results["overhead"]["rows"].items():
        say(f"{name}: {row['step_ratio']:.2f}x the float step time, "
            f"{row['memory_ratio']:.2f}x its memory")
    size = make_cost_model("size")
    table = size.table(space)
    from nas.plan import Plan

    w8a8 = size.plan_cost(Plan.uniform(space, 8, 8), space)
    results["w8a8_size"] = w8a8
    results["targets"] = []
    middle = None
    for fraction in fractions:
        target = Target("size", w8a8 * fraction, f"size={w8a8 * fraction / 1e3:.1f}KB")
        torch.manual_seed(seed)
        net = Supernet(model, space, seed=seed)
        cfg = DnasConfig(budget=budget, target=target, batch_size=batch_size, seed=seed,
                         progress=False)
        state, optim_state, _ = search(net, splits, table, cfg, device)
        if "state_save" not in results:
            results["state_save"] = state_save(space, net, optim_state, state)
            say(f"search state save: {results['state_save']['save_s'] * 1e3:.1f} ms, "
                f"{results['state_save']['overhead'] * 100:.2f} % of the step time")
        cands, best = derive(net, table, target, splits, device, samples, seed)
        row = {"target_fraction": fraction, "target": target.value, "plan_size": best.cost,
               "meets_target": best.meets_target, "dnas_accuracy": best.accuracy,
               "plan": [str(m.choices[i]) for m, i in zip(net.mixed(), best.indices)]}
        for w, a in ((8, 8), (4, 8), (2, 8), (4, 4)):
            idx = uniform_indices(space, Choice(w, a))
            if idx is not None:
                row[f"W{w}A{a}_accuracy"] = one_shot_accuracy(net, idx, splits, device, eval_batches=20)
                row[f"W{w}A{a}_size"] = table.index_cost(idx)
        results["targets"].append(row)
        say(f"target {target.text}: plan {best.cost / 1e3:.1f} KB, one-shot {best.accuracy:.2f}%")
        if middle is None or fraction == fractions[len(fractions) // 2]:
            middle = (net, target, best)

    net, target, best = middle
    # Random plans of (nearly) equal size: the random searcher's, those within 10 % under
    # the target.
    problem = SearchProblem(space, {"size": table}, "size", target, SearchBudget("trials", 1),
                            seed + 99)
    searcher, randoms = RandomSearcher(problem), []
    for _ in range(200000):
        idx = searcher.ask()
        if idx is None or len(randoms) >= random_plans:
            break
        cost = table.index_cost(idx)
        if 0.9 * target.value <= cost:
            randoms.append({"size": cost, "indices": idx,
                            "accuracy": one_shot_accuracy(net, idx, splits, device,
                                                          eval_batches=20)})
    results["random"] = {"target": target.value, "dnas_accuracy": best.accuracy,
                         "dnas_size": best.cost, "plans": randoms,
                         "best_random_accuracy": max((r["accuracy"] for r in randoms), default=None),
                         "median_random_accuracy": statistics.median([r["accuracy"] for r in randoms])
                         if randoms else None}
    if randoms:
        # The best of 20 plans scored on one split is biased upward by that split's noise
        # (the winner's curse); the DNAS plan was also picked on it. Both are scored again on
        # the test split, which neither selection saw.
        top = max(randoms, key=lambda r: r["accuracy"])
        results["random"]["held_out"] = {
            "split": "test", "dnas_accuracy": one_shot_accuracy(net, best.indices, splits, device,
                                                                split="test"),
            "best_random_accuracy": one_shot_accuracy(net, top["indices"], splits, device,
                                                      split="test")}
    say(f"random plans at {target.text}: best {results['random']['best_random_accuracy']}, "
        f"DNAS {best.accuracy:.2f}%")
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    scaled = [scaling_table(results["scaling"])] if "scaling" in results else []
    if "overhead" not in results:  # --scaling-only
        return scaled
    o = results["overhead"]
    out = [(f"Supernet overhead (same model, batch {o['batch_size']}; median of {o['steps']} "
            f"steps; memory: {o['memory_measure']})",
            ["step", "ms", "/ fp", "memory MB", "memory / fp"],
            [["float model", round(o["fp_step_s"] * 1e3, 1), 1.0, round(o["fp_memory"] / 1e6, 1),
              1.0]]
            + [[name, round(r["step_s"] * 1e3, 1), round(r["step_ratio"], 2),
                round(r["memory"] / 1e6, 1), round(r["memory_ratio"], 2)]
               for name, r in o["rows"].items()])]
    if "state_save" in results:
        v = results["state_save"]
        out.append((f"Search state save (supernet.pt with optimizers, atomic + fsync; median of "
                    f"{v['repeats']}; a save every {v['steps_between']} steps)",
                    ["save ms", "file MB", "search step ms", "steps between saves",
                     "overhead %"],
                    [[round(v["save_s"] * 1e3, 1), round(v["bytes"] / 1e6, 2),
                      round(v["step_s"] * 1e3, 1), v["steps_between"],
                      round(v["overhead"] * 100, 3)]]))
    headers = ["target KB", "plan KB", "meets", "DNAS acc %"]
    uniform = [k for k in ("W8A8", "W4A8", "W2A8", "W4A4") if f"{k}_accuracy" in results["targets"][0]]
    headers += [f"{k} acc % ({results['targets'][0][f'{k}_size'] / 1e3:.1f} KB)" for k in uniform]
    out.append(("Size targets: DNAS plan vs uniform plans on the same supernet (one-shot)", headers,
                [[round(r["target"] / 1e3, 1), round(r["plan_size"] / 1e3, 1),
                  "yes" if r["meets_target"] else "NO", round(r["dnas_accuracy"], 2)]
                 + [round(r[f"{k}_accuracy"], 2) for k in uniform] for r in results["targets"]]))
    r = results["random"]
    held = r.get("held_out")
    out.append(("DNAS vs random plans of equal size (one-shot, same supernet; arch split, then "
                "the two selected plans on the test split)",
                ["target KB", "random plans", "best random %", "median random %", "DNAS %",
                 "test: best random %", "test: DNAS %", "DNAS >= best random (test)"],
                [[round(r["target"] / 1e3, 1), len(r["plans"]),
                  "-" if r["best_random_accuracy"] is None else round(r["best_random_accuracy"], 2),
                  "-" if r["median_random_accuracy"] is None else round(r["median_random_accuracy"], 2),
                  round(r["dnas_accuracy"], 2),
                  "-" if held is None else round(held["best_random_accuracy"], 2),
                  "-" if held is None else round(held["dnas_accuracy"], 2),
                  "-" if held is None else
                  ("yes" if held["dnas_accuracy"] >= held["best_random_accuracy"] else "no")]]))
    return out + scaled


# ---------------------------------------------------------------- data-parallel scaling

COMM_REPEATS = 20


def scaling(space, model, splits, data_args, workers: int, steps: int, batch_size: int,
            seed: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The same search (`steps` steps, theta trained from the first, global batch
    `batch_size`) on one worker in this process and on `workers` Ray Train workers, each
    with one CPU and one torch thread, so the ratio is of workers, not of threads. Ray's
    start is not timed: the steps per second are the search's own (its clock)."""
    import os
    import tempfile
    from pathlib import Path

    from nas.search.dnas import SearchState
    from nas.search.dnas_output import DnasOutput
    from nas.search.dnas_train import DnasJob, run_workers
    from nas.plan import Plan

    size = make_cost_model("size")
    table = size.table(space)
    w8a8 = size.plan_cost(Plan.uniform(space, 8, 8), space)
    target = Target("size", w8a8 / 2, f"size={w8a8 / 2e3:.1f}KB")
    per_epoch = max(1, len(splits.train) // batch_size)
    cfg = DnasConfig(budget=Budget("epochs", steps / per_epoch), target=target,
                     batch_size=batch_size, seed=seed, warmup=0.0, progress=False)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        state, _, _ = search(Supernet(model, space, seed=seed), splits, table, cfg, cpu)
    finally:
        torch.set_num_threads(threads)
    rows = [{"workers": 1, "steps": state.step, "seconds": state.elapsed}]
    say(f"1 worker: {state.step / state.elapsed:.2f} steps/s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(seed)
        net = Supernet(model, space, seed=seed)
        job = DnasJob(space=space, data_args=data_args, supernet=net.state_dict(),
                      gumbel_state=net.generator.get_state(), rng=torch.get_rng_state(),
                      factored=False, mode=net.mode, cfg=cfg, table=table, state=SearchState(),
                      optimizers=None, output=DnasOutput(folder, space, seed, False, None, None),
                      cpus=1, gpu=False)
        run_workers(job, workers=workers, cpus_per_worker=1, gpus_per_worker=0, address=None,
                    folder=folder, progress=False, total_steps=None, loop=_timed_loop)
        done = torch.load(folder / "supernet.pt", weights_only=True)["search_state"]
        comm = json.loads((folder / "comm.json").read_text())
    rows.append({"workers": workers, "steps": done["step"], "seconds": done["elapsed"], **comm})
    say(f"{workers} workers: {done['step'] / done['elapsed']:.2f} steps/s, all-reduce "
        f"{comm['allreduce_s'] * 1e3:.2f} ms per step")
    for row in rows:
        row["steps_per_s"] = row["steps"] / row["seconds"]
        row["speedup"] = row["steps_per_s"] / rows[0]["steps_per_s"]
    return {"batch_size": batch_size, "steps": steps, "rows": rows,
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}


def _timed_loop(config: dict) -> None:
    """A worker's search, then its communication per step timed alone (median of
    COMM_REPEATS): the all-reduce of the weight gradients and of theta's, and DDP's two
    broadcasts of the buffers (running statistics, input ranges) before the step's forwards.
    Rank 0 writes comm.json beside supernet.pt."""
    import torch.distributed as dist

    from nas.search.dnas_train import worker_loop

    worker_loop(config)
    job = config["job"]
    net = Supernet(job.space.build_model(), job.space)
    grads = [torch.zeros(sum(p.numel() for p in ps))
             for ps in (net.weight_parameters(), net.arch_parameters()) if ps]
    buffers = torch.zeros(sum(b.numel() for b in net.buffers()))

    def timed(op) -> float:
        times = []
        for _ in range(COMM_REPEATS + 3):
            dist.barrier()
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:])  # the first ones set up the connections

    comm = {"allreduce_s": timed(lambda: [dist.all_reduce(g) for g in grads]),
            "broadcast_s": 2 * timed(lambda: dist.broadcast(buffers, 0)),
            "gradient_values": sum(g.numel() for g in grads)}
    if dist.get_rank() == 0:
        (job.output.folder / "comm.json").write_text(json.dumps(comm))


def scaling_table(s: dict[str, Any]) -> tuple[str, list[str], list[list[Any]]]:
    return (f"Data-parallel scaling (global batch {s['batch_size']}, {s['steps']} steps, one CPU "
            f"and torch thread per worker; gloo on this machine's {s['cpus']} CPUs, load "
            f"average {s['load_average']:.1f}; communication timed alone)",
            ["workers", "steps/s", "speed-up", "step ms", "all-reduce ms/step",
             "buffer broadcast ms/step"],
            [[r["workers"], round(r["steps_per_s"], 2), round(r["speedup"], 2),
              round(r["seconds"] / r["steps"] * 1e3, 1),
              round(r["allreduce_s"] * 1e3, 2) if "allreduce_s" in r else "-",
              round(r["broadcast_s"] * 1e3, 2) if "broadcast_s" in r else "-"]
             for r in s["rows"]])
