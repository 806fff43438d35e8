"""The ``selfflow`` command: a preset or a config file, plus ``dotted.key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import tomli_w

from selfflow_core.config.converter import apply_overrides, make_converter, structure, to_data
from selfflow_core.config.resolve import resolve_config
from selfflow_core.config.validate import source_problems
from selfflow_core.errors import CheckpointError, ConfigError, SelfFlowError
from selfflow_core.plugins.manager import Components
from selfflow_core.sampling import METHODS


def _drop_none(data):
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_drop_none(v) for v in data]
    return data


def _target(args) -> tuple[str | None, list[str]]:
    """The preset or file and the overrides; a first ``key=value`` with no target before it is an
    override of the default preset (``selfflow train steps=500``), not a preset's name."""
    target, overrides = args.target, list(args.overrides)
    if target and "=" in target and not Path(target).exists():
        return None, [target, *overrides]
    return target, overrides


def train_summary(summary: dict, run_dir: str) -> str:
    """The final line of ``selfflow train``: what was done, and where the run and samples are."""
    step, samples = summary["step"], summary.get("samples_dir")
    if summary["reason"] == "done" and summary.get("steps_run", 1) == 0:
        return f"already done (step {step}); re-sampled to {samples}; run: {run_dir}"
    start = summary.get("start_step", 0)
    did = (f"trained {step} steps" if not start else f"trained step {step}" if step == start + 1
           else f"trained steps {start + 1}-{step}")  # (resumed at step `start`)
    loss = summary.get("final_loss")
    line = (f"{did} ({summary['reason']}) in {summary['seconds']:.0f}s; final loss "
            + (f"{loss:.4f}" if loss is not None else "n/a"))
    return line + (f"; samples: {samples}" if samples else "") + f"; run: {run_dir}"


def cmd_train(args, components):
    from selfflow_core.trainer import Trainer

    config = resolve_config(components, *_target(args))
    trainer = Trainer(config, components=components)
    summary = trainer.fit()
    if trainer.dist.is_main:  # under torchrun: one final line, from rank 0
        print(train_summary(summary, config.run_dir))


def cmd_config(args, components):
    config = resolve_config(components, *_target(args))
    if args.action == "show":
        print(tomli_w.dumps(_drop_none(to_data(make_converter(components), config))), end="")
    else:
        print(f"ok: {args.target or components.presets.default} is a valid config")


def cmd_encode(args, components):
    from selfflow_core.data.order import ShuffledWrite
    from selfflow_core.data.writer import encode_store

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and args.workers > 1:
        raise ConfigError([f"--workers {args.workers} under torchrun: every rank is one worker "
                           "already (set the number with --nproc-per-node); leave --workers "
                           "out"], "selfflow encode")
    conv = make_converter(components)
    cls = components.modalities.get(args.modality)
    text_options = [o for o in args.overrides if o.startswith(TEXT_PREFIX)]
    data = apply_overrides({}, [o for o in args.overrides if o not in text_options])
    where = f"modality {args.modality!r} options"
    mod_cfg = structure(conv, data, cls, source=where)
    problems = mod_cfg.problems() or source_problems(mod_cfg, args.source)
    if problems:
        raise ConfigError(problems, where)
    adapter = mod_cfg.build()
    if args.shuffle_seed is not None:  # written in a random order (ModalitySpec.shuffle_on_write)
        adapter = ShuffledWrite(adapter, args.shuffle_seed)
    if text_options:  # a frozen text encoder's output is precomputed into the store
        adapter = _with_text_encoder(adapter, conv, text_options)
    store = encode_store(adapter, args.source, args.store, batch_size=args.batch_size,
                         adapter_config=to_data(conv, mod_cfg), progress=rank == 0,
                         repair=args.repair, workers=args.workers, distributed=world > 1,
                         shards=args.shards)
    if rank == 0:  # under torchrun: one final line, from rank 0
        print(f"store {args.store}: {len(store)} samples of {args.modality} from "
              f"{args.source!r}")


TEXT_PREFIX = "text_encoder."


def _with_text_encoder(adapter, conv, options: list[str]):
    """``adapter`` storing the output of the frozen text encoder ``text_encoder.*=...`` gives
    (as the run with that ``text_encoder`` would make the store)."""
    from selfflow_core.interfaces import TextEncoderConfig
    from selfflow_core.prompts import CAPTIONS, WithTextEmbeddings

    where = "text encoder options (text_encoder.*)"
    kind_first = sorted(options, key=lambda o: not o.startswith(f"{TEXT_PREFIX}kind="))
    data = apply_overrides({}, kind_first)["text_encoder"]
    encoder = structure(conv, data, TextEncoderConfig, source=where).build()
    if encoder.trainable:
        raise ConfigError([f"$.kind: the {data.get('kind')!r} text encoder is trained with the "
                           "model from the stored captions; there is nothing to precompute "
                           "(drop the text_encoder.* options)"], where)
    if CAPTIONS not in adapter.fields():
        raise ConfigError([f"the modality stores no {CAPTIONS!r} field with these options (give "
                           "it captions, e.g. captions=4) for a text encoder to encode"], where)
    return WithTextEmbeddings(adapter, encoder)


def cmd_store(args, components):
    """``selfflow store check STORE``: what the store holds (schema, samples, chunking, codecs,
    completeness), then ``ok`` or every problem of a full read (exit status 1); ``--sample F``:
    of a read of that share of each field's chunks (every chunk file is still looked for)."""
    from selfflow_core.data.check import describe_store
    from selfflow_core.data.store import check_store

    lines = describe_store(args.store)
    if lines:
        print(f"store {args.store}:")
        for line in lines:
            print(f"  {line}")
    if args.sample < 1:
        print(f"store {args.store}: reading a sample of {args.sample:g} of each field's chunks "
              f"(seed {args.seed})")
    problems = check_store(args.store, fraction=args.sample, seed=args.seed)
    if problems:
        print(f"store {args.store}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"store {args.store}: ok")


def cmd_sample(args, components):
    from selfflow_core.eval.samples import sample_run

    paths = [args.checkpoint, *args.more_checkpoints]
    if len(paths) > 1:
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise CheckpointError(
            f"selfflow sample takes one checkpoint, got {len(paths)} paths ({shown}; a shell "
            f"glob such as step-*.pt expands to every checkpoint): give the run directory (its "
            f"latest checkpoint), its checkpoints/ folder, or one checkpoint file")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"--prompts-file {args.prompts_file}: cannot be read as UTF-8 "
                               f"text ({type(exc).__name__})"]) from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    result = sample_run(args.checkpoint, components, out_dir=args.out, count=args.count,
                        steps=args.steps, method=args.method, cfg_scale=args.cfg_scale,
                        seed=args.seed, condition_t=args.condition_t,
                        sde_last_step=args.sde_last_step,
                        sde_diffusion_norm=args.sde_diffusion_norm, prompts=prompts or None)
    s = result.sampling
    method = s.method
    if s.method == "sde":
        method += f" (last step {s.sde_last_step:g}, diffusion norm {s.sde_diffusion_norm:g})"
    held = f", conditioning at t = {s.condition_t:g}" if s.condition_t else ""
    print(f"sampled {s.count} per modality from {result.checkpoint} (step {result.step}) with "
          f"the {result.weights} weights: {method}, {s.steps} steps, cfg scale {s.cfg_scale:g}"
          f"{held}, seed {s.seed}; wrote {len(result.paths)} file(s) to {result.out_dir}")
    for p in result.paths:
        print(p)


def cmd_evaluate(args, components):
    from selfflow_core.eval.evaluate import evaluate_run

    out = evaluate_run(args.checkpoint, components, count=args.count, prompts=args.prompt,
                       steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                       out_dir=args.out)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"evaluated {out['checkpoint']} (step {out['step']}, {out['weights']} weights)")
    for name, metrics in out["modalities"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"  {name}: {shown}")


def cmd_plugins(args, components):
    registered = components.by_plugin()
    rows = []
    for name, provider in components.pm.providers.items():
        rows.append({"plugin": name, "distribution": provider.distribution,
                     "version": provider.version, "components": registered.get(name, [])})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['plugin']}  ({row['distribution']} {row['version']})")
        for c in row["components"]:
            print(f"    {c}")


def cmd_new_modality(args: argparse.Namespace, components: Components | None = None) -> int | None:
    """``selfflow new-modality NAME [--dir DIR]`` (needs no plugins loaded)."""
    from selfflow_core.cli.scaffold import names, new_modality

    dest = new_modality(args.name, args.dir)
    n = names(args.name)
    print(f"wrote {n['dist']} (modality {args.name!r}, package {n['package']}) to {dest}\n"
          f"next:\n  pip install -e {dest}\n  python -m pytest {dest / 'tests'} -q\n"
          f"  selfflow train {args.name}_debug_tiny")


def _at_least(low, kind=int):
    """An argparse type: a number of ``kind`` >= ``low`` (a bad one is argparse's one error line,
    exit status 2)."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not value >= low:  # (also refuses a float nan)
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return convert


def _within(low: float, high: float, *, low_open: bool = False):
    """An argparse type: a number in ``[low, high)`` (``(low, high)`` with ``low_open``)."""
    def convert(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (low < value if low_open else low <= value) and value < high  # refuses nan
        if not inside:
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if low_open else '['}{low:g}, {high:g}), got {text}")
        return value
    return convert


def _shards(text: str) -> str | int | None:
    """An argparse type: ``auto``, ``none`` or a number of samples per shard."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or samples per shard, got "
                                         f"{text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number in ``(0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:  # refuses nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with a usage mistake reported as one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="selfflow", description=(
        "Train generative models with Self-Flow (self-supervised flow matching)."))
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a preset or a config file", description=(
        "Train from a preset (default: the installed main job, e.g. image) or a TOML/JSON "
        "config, then apply "
        "dotted.key=value overrides, e.g. `selfflow train image steps=500 optim.lr=3e-4`. "
        "Re-running resumes from the run's latest checkpoint (a finished run only re-samples); "
        "a different config needs a run directory of its own (run_dir=<new dir>)."))
    t.add_argument("target", nargs="?", help="preset name or path to a .toml/.json config")
    t.add_argument("overrides", nargs="*", help="dotted.key=value (values are TOML literals)")
    c = sub.add_parser("config", help="show or validate a resolved config")
    c.add_argument("action", choices=["show", "validate"])
    c.add_argument("target", nargs="?", help="preset name or path to a .toml/.json config")
    c.add_argument("overrides", nargs="*", help="dotted.key=value")
    e = sub.add_parser("encode", help="encode raw data of a modality into a zarr latent store",
                       description="Encode <source> with <modality>'s encoder into <store>; an "
                       "interrupted encode resumes where it stopped.")
    e.add_argument("modality")
    e.add_argument("source", help="a built-in source name of the modality or a path")
    e.add_argument("store", help="path (or zarr store URL) of the store to write")
    e.add_argument("overrides", nargs="*",
                   help="modality config key=value; text_encoder.kind=... (and its options, "
                   "text_encoder.path=...) also stores a frozen text encoder's output for every "
                   "caption, as a run with that text_encoder does")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--shuffle-seed", type=int, default=None, metavar="SEED",
                   help="write the store in the random order of SEED (a run's "
                   "shuffle_on_write = SEED makes and reuses the same store)")
    e.add_argument("--repair", action="store_true",
                   help="re-encode the damaged chunks of an existing store from the source "
                   "(without it, a damaged store is refused, naming each damaged chunk)")
    e.add_argument("--workers", type=_at_least(1), default=1,
                   help="encode in chunk-aligned ranges with this many processes on this "
                   "machine, one GPU each where there are GPUs (under torchrun every rank is "
                   "one worker instead); resumable per range, see docs/store.md")
    e.add_argument("--shards", type=_shards, default="auto", metavar="auto|none|N",
                   help="a new store's shard files: auto (default: the fields larger than 2 GiB "
                   "in shards of about 128 MiB), none, or N samples per shard for every field "
                   "whose chunks are shorter (docs/store.md, \"Sharded stores\")")
    s = sub.add_parser("store", help="inspect latent stores")
    s.add_argument("action", choices=["check"])
    s.add_argument("store")
    s.add_argument("--sample", type=_fraction, default=1.0,
                   metavar="F", help="read only this share of each field's chunks, in (0, 1] "
                   "(drawn with --seed; the last one always; every chunk file is still looked "
                   "for): a faster, partial check of a large store (default 1: all)")
    s.add_argument("--seed", type=int, default=0, help="the draw of --sample's chunks")
    sm = sub.add_parser(
        "sample", help="generate samples from a checkpoint",
        description="Generate samples from a run's checkpoint with the weights it holds (the "
        "evaluation EMA, else the EMA teacher, else the raw student) and the run's sampling "
        "settings, each option replacing one. Never overwrites the training's samples; the "
        "folder's sample_info.json says which weights they came from.")
    sm.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT",
                    help="a run directory (its latest checkpoint), its checkpoints/ folder or a "
                    "checkpoint (step-N.pt or step-N.dcp)")
    # more paths (a shell glob such as step-*.pt) are taken only to be refused in one line
    sm.add_argument("more_checkpoints", nargs="*", help=argparse.SUPPRESS)
    sm.add_argument("--out", default=None, help="output folder (default: a new "
                    "<run_dir>/samples/sample-<step>-<n>/)")
    sm.add_argument("--count", type=_at_least(1), default=None, help="samples per modality")
    sm.add_argument("--steps", type=_at_least(1), default=None, help="solver steps")
    sm.add_argument("--method", choices=list(METHODS), default=None,
                    help="euler or heun (ODE), or sde (Euler-Maruyama, the paper's ImageNet "
                    "sampler)")
    sm.add_argument("--cfg-scale", type=_at_least(0.0, float), default=None,
                    help="classifier-free guidance scale (1: none)")
    sm.add_argument("--seed", type=int, default=None)
    sm.add_argument("--condition-t", type=_within(0.0, 1.0), default=None,
                    help="time in [0, 1) the conditioning tokens are held at (0: clean)")
    sm.add_argument("--sde-last-step", type=_within(0.0, 1.0, low_open=True), default=None,
                    help="sde: length of the final noise-free step, in (0, 1)")
    sm.add_argument("--sde-diffusion-norm", type=_at_least(0.0, float), default=None,
                    help="sde: diffusion scale (0: the Euler ODE with the last step)")
    sm.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="a prompt to sample (repeatable; prompt-conditioned runs); one sample "
                    "per prompt unless --count")
    sm.add_argument("--prompts-file", default=None, metavar="FILE",
                    help="a UTF-8 file of prompts, one per line")
    ev = sub.add_parser("evaluate", help="measure prompt following of a prompt-conditioned "
                        "run with its modalities' fixed evaluators")
    ev.add_argument("checkpoint", help="a checkpoint file, or a run directory (its latest)")
    ev.add_argument("--count", type=_at_least(1), default=40,
                    help="evaluation prompts per modality")
    ev.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="evaluate these prompts instead (repeatable)")
    ev.add_argument("--steps", type=_at_least(1), default=None, help="solver steps")
    ev.add_argument("--cfg-scale", type=_at_least(0.0, float), default=None)
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--out", default=None, help="also keep the samples and evaluation.json here")
    ev.add_argument("--json", action="store_true")
    pl = sub.add_parser("plugins", help="list plugins and the components each registered")
    pl.add_argument("--json", action="store_true")
    nm = sub.add_parser(
        "new-modality", help="write a new modality plugin package from the template",
        description="Write a complete, installable modality plugin (pyproject with the entry "
        "point, adapter, plugin, presets, contract tests, README) for modality NAME into DIR "
        "(default ./selfflow-NAME, with - for _). It trains as it is, on synthetic "
        "multichannel signals; edit it for your data. See docs/writing-a-modality.md.")
    nm.add_argument("name", help="the modality kind: lowercase snake_case, e.g. eeg")
    nm.add_argument("--dir", default=None,
                    help="package directory to create (must not exist or be empty)")
    return p


COMMANDS = {"train": cmd_train, "config": cmd_config, "encode": cmd_encode, "store": cmd_store,
            "sample": cmd_sample, "evaluate": cmd_evaluate, "plugins": cmd_plugins,
            "new-modality": cmd_new_modality}
#: commands that need no plugins loaded (they work even when an installed plugin is broken)
NO_PLUGINS = {"new-modality"}
#: commands that continue where an interrupted run of them stopped
RESUMABLE = {"train", "encode"}


def main(argv: list[str] | None = None) -> int:
    """Run the ``selfflow`` command; a user's mistake (any :class:`SelfFlowError`) is one
    ``error:`` line on stderr and exit status 2, never a traceback."""
    args = parser().parse_args(argv)
    try:
        components = None if args.command in NO_PLUGINS else Components()
        return COMMANDS[args.command](args, components) or 0
    except SelfFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the trainer's own stop handling (encode, ...)
        again = "; run the same command again to resume" if args.command in RESUMABLE else ""
        print(f"\ninterrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
