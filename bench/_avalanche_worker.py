"""Runs inside Avalanche's virtualenv (bench/setup_avalanche.sh), called by bench/continual_vs_avalanche.py: one
online class-incremental run of Avalanche 0.6.0's ER or ER-ACE on the stream the JSON job on stdin describes
(per task, Fashion-MNIST's training indices in the order malleable's engine walks them, and the test indices).

* `er`: avalanche.training.OnlineNaive (the online wrapper of Naive: one pass per sub-experience) with a
  ReplayPlugin over a ReservoirSamplingBuffer of `buffer` examples, mini-batch `batch_size` joined with
  `replay_batch_size` replayed examples in one cross-entropy; the buffer is updated after each sub-experience;
* `er_ace`: avalanche.training.ER_ACE (its ClassBalancedBuffer, its ACECriterion), the same sizes.
The stream is Avalanche's own online stream: split_online_stream(train_stream, experience_size=batch_size,
shuffle=False), each sub-experience trained with strategy.train(), as Avalanche's online examples do. The model is
malleable's small_cnn built after torch.manual_seed(seed), the same initial weights as the malleable run of that
seed; SGD at `lr`. Accuracy per task is computed here after each task (the same top-1 as malleable's), with
Avalanche's evaluator given no metrics, so neither tool pays for logging. Timing: `train_seconds` is the time in
strategy.train() calls; `wall_s` the process from the start of this file. Writes JSON to stdout.

torchvision 0.28's only wheel here is a CUDA build whose compiled ops do not load against the CPU torch; its
import then fails on registering fake kernels for two detection ops (nms, qnms) that Avalanche never calls. The two
schemas are declared before the import so that torchvision imports; nothing else is touched.
"""

import time

START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

_TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _TORCHVISION_SHIM.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import avalanche  # noqa: E402
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets  # noqa: E402
from avalanche.benchmarks.scenarios.online import split_online_stream  # noqa: E402
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset  # noqa: E402
from avalanche.training import ER_ACE, OnlineNaive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin  # noqa: E402
from avalanche.training.storage_policy import ReservoirSamplingBuffer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from malleable.data.vision import load_image_dataset  # noqa: E402  (numpy + gzip only)
from malleable.models.vision import small_cnn  # noqa: E402  (torch only)


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def scores(model: torch.nn.Module, tests: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    model.eval()
    out = []
    with torch.no_grad():
        for x, y in tests:
            pred = torch.cat([model(x[i:i + 1024]).argmax(-1) for i in range(0, len(x), 1024)])
            out.append(round(100.0 * (pred == y).float().mean().item(), 4))
    model.train()
    return out


def strategy(job: dict, model: torch.nn.Module):
    optimizer = torch.optim.SGD(model.parameters(), lr=job["lr"])
    common = {"model": model, "optimizer": optimizer, "criterion": torch.nn.CrossEntropyLoss(),
              "train_mb_size": job["batch_size"], "eval_mb_size": 1024, "device": "cpu",
              "evaluator": EvaluationPlugin()}
    if job["method"] == "er":
        replay = ReplayPlugin(mem_size=job["buffer"], batch_size=job["batch_size"],
                              batch_size_mem=job["replay_batch_size"],
                              storage_policy=ReservoirSamplingBuffer(max_size=job["buffer"]))
        return OnlineNaive(train_passes=1, plugins=[replay], **common)
    if job["method"] == "er_ace":
        return ER_ACE(mem_size=job["buffer"], batch_size_mem=job["replay_batch_size"], train_epochs=1, **common)
    raise SystemExit(f"_avalanche_worker: unknown method {job['method']!r}")


def main() -> None:
    job = json.load(sys.stdin)
    if job.get("check"):
        json.dump({"avalanche": avalanche.__version__, "torch": torch.__version__}, sys.stdout)
        return
    torch.set_num_threads(job["threads"])
    data = load_image_dataset("fashion_mnist")
    train, test = data["train"], data["test"]
    train_sets, tests = [], []
    for task in job["tasks"]:
        idx = torch.tensor(task["train"])
        y = train.labels[idx].long()
        train_sets.append(_make_taskaware_tensor_classification_dataset(train.images[idx], y, targets=y.tolist(),
                                                                        task_labels=0))
        t = torch.tensor(task["test"])
        tests.append((test.images[t], test.labels[t].long()))
    torch.manual_seed(job["seed"])
    model = small_cnn(train.images.shape[1], len(train.classes), train.images.shape[2], job["width"])
    cl = strategy(job, model)
    online = split_online_stream(benchmark_from_datasets(train=train_sets).train_stream,
                                 experience_size=job["batch_size"], shuffle=False)
    matrix, train_seconds = [scores(model, tests)], 0.0
    ends = list(torch.cumsum(torch.tensor([len(t["train"]) for t in job["tasks"]]), 0).tolist())
    seen = 0
    for exp in online:
        start = time.perf_counter()
        cl.train(exp)
        train_seconds += time.perf_counter() - start
        seen += len(exp.dataset)
        if ends and seen == ends[0]:
            ends.pop(0)
            matrix.append(scores(model, tests))
    json.dump({"accuracy_matrix": matrix, "train_seconds": round(train_seconds, 2),
               "wall_s": round(time.perf_counter() - START, 2), "peak_rss_mb": vm_hwm_mb(),
               "threads": torch.get_num_threads(), "versions": {"avalanche": avalanche.__version__, "torch": torch.__version__}}, sys.stdout)


if __name__ == "__main__":
    main()
