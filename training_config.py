"""config.json: every training parameter, its default and why, validation, and the lock.

`config.json` in the training root holds the parameters below. The ones named in
`locked` (at least the base model, max_length, learning_rate and dtype) are approved:
their approved values live in `.config.lock`, and while a locked value differs from it
the daemon refuses to train and the state tracker warns, naming `old -> new` and
`python3 training_controller.py approve-config`.

    from training_config import load_config, changed_locked
    cfg = load_config(root)               # raises ConfigError listing every bad key
    for name, old, new, newly in changed_locked(root, cfg): ...

Standard library only: control scripts import it and must stay fast.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import NamedTuple

from trainroot import GuardrailError, Paths, atomic_write_json, model_folder, read_json, require_root, utc_now

SCHEMA_VERSION = 1
APPROVE_COMMAND = "python3 training_controller.py approve-config"


class ConfigError(GuardrailError):
    """An invalid config.json; `errors` lists every problem, each naming its key."""

    def __init__(self, errors: list[str], where):
        self.errors = list(errors)
        what = "invalid config (" + "; ".join(self.errors) + ")"
        super().__init__(what, where, f"Fix config.json, then run `{APPROVE_COMMAND}`"
                         " if a locked parameter changed.")


class Param(NamedTuple):  # a NamedTuple, not a dataclass: `import dataclasses` costs ~6 ms
    default: object      # at every start of every control script
    kind: str            # int, float, bool, str, choice, path, list, fields, modules
    why: str             # one line: why this default
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    nullable: bool = False


PARAMS: dict[str, Param] = {
    # -- the model --
    "base_model": Param("tiny", "str", "identity of the model this run started from; locked so a "
                        "different model never silently continues the run"),
    "max_length": Param(256, "int", "tokens per packed row; 256 keeps CPU steps under a second "
                        "on the tiny model", 8, 1_048_576),
    "dtype": Param("float32", "choice", "float32 is exact and reproducible on CPU; bfloat16 "
                   "(autocast) is faster on GPU and AMX CPUs; float16 (autocast with loss "
                   "scaling) works on GPU and CPU", choices=("float32", "bfloat16", "float16")),
    # -- adapter mode (lora_mode.py; docs/adapters.md) --
    "finetune": Param("full", "choice", "full trains every weight (each version a full copy); "
                      "lora trains a small adapter over an immutable base (versions of megabytes)",
                      choices=("full", "lora")),
    "lora_r": Param(8, "int", "LoRA rank: 8 on all linear layers is the usual start, an adapter "
                    "well under 1% of the model", 1, 65_536),
    "lora_alpha": Param(16, "float", "LoRA scale (alpha / r): twice the rank is the usual choice",
                        0.0, 1e6),
    "lora_dropout": Param(0.0, "float", "dropout on the adapter's input; 0 keeps CPU resume "
                          "bitwise and is fine for continuous training", 0.0, 1.0),
    "lora_target_modules": Param("all-linear", "modules", "\"all-linear\" adapts every linear "
                                 "layer but the output head (quality close to full fine-tuning); "
                                 "or a list of module names, e.g. [\"q_proj\", \"v_proj\"]"),
    "consolidate_every_files": Param(0, "int", "merge the adapter into a new base every N trained "
                                     "files (model_versioner.py consolidate); 0: only by hand",
                                     0, 1_000_000),
    # -- the optimizer and schedule --
    "learning_rate": Param(3e-4, "float", "a safe AdamW rate for small causal LMs; locked because "
                           "a wrong one ruins weeks of training", 0.0, 1.0),
    "batch_size": Param(8, "int", "packed rows per micro-batch; fits the tiny model in a few MB",
                        1, 65_536),
    "grad_accum_steps": Param(1, "int", "micro-batches per optimizer step; raise it to grow the "
                              "effective batch without memory", 1, 65_536),
    "lr_schedule": Param("constant_with_warmup", "choice", "continuous training has no end, so a "
                         "decaying schedule would starve later files",
                         choices=("constant_with_warmup", "cosine_with_restarts", "constant")),
    "warmup_steps": Param(20, "int", "ramps the LR once at the start of the run, not per file",
                          0, 10_000_000),
    "cosine_cycle_steps": Param(1000, "int", "cycle length for cosine_with_restarts", 1, 10_000_000),
    "weight_decay": Param(0.0, "float", "off by default: decaying toward zero fights fine-tuning "
                          "from a pretrained model", 0.0, 1.0),
    "max_grad_norm": Param(1.0, "float", "clips rare huge gradients from odd records; 0 turns it off",
                           0.0, 1e6),
    "adam_beta1": Param(0.9, "float", "AdamW's usual momentum", 0.0, 0.999999),
    "adam_beta2": Param(0.999, "float", "AdamW's usual second-moment decay", 0.0, 0.999999),
    "adam_eps": Param(1e-8, "float", "AdamW's usual epsilon", 0.0, 1.0),
    "seed": Param(1234, "int", "fixes initial RNG so runs are reproducible", 0, 2**32 - 1),
    "num_threads": Param(0, "int", "torch CPU threads; 0 means all cores (background work runs "
                         "at idle priority instead of taking a core)", 0, 4096),
    # -- data --
    "loss_on_prompt": Param(False, "bool", "train only on responses of chat/prompt/instruction "
                            "records, as instruction tuning expects"),
    "pack_isolation": Param(True, "bool", "documents packed in one row never attend to each other "
                            "and positions restart at each; false shares attention across a row "
                            "(cheaper, leaks context between examples)"),
    "allow_mixed_formats": Param(False, "bool", "one file, one format: a mixed file is usually "
                                 "a mistake worth stopping for"),
    "max_record_bytes": Param(64 * 1024 * 1024, "int", "longest line accepted; longer lines are "
                              "errors rather than a memory blow-up", 1024, 1 << 34),
    "chat_template": Param(None, "str", "null renders chat records with the model's own template "
                           "(what it is prompted with); \"plain\" or a named/.jinja alternative "
                           "only when chosen on purpose", nullable=True),
    "fields": Param({}, "fields", "maps a format's field names to the names your files use, e.g. "
                    "{\"prompt\": \"user_prompt\", \"completion\": \"expected_answer\"}; "
                    "empty: the standard names"),
    # -- checkpoints and safety --
    "checkpoint_every_steps": Param(50, "int", "bounds work lost to a crash to 50 steps; 0 turns "
                                    "the step trigger off", 0, 10_000_000),
    "checkpoint_every_minutes": Param(10.0, "float", "bounds lost wall time on slow steps; 0 turns "
                                      "the time trigger off", 0.0, 1e6),
    "keep_checkpoints": Param(2, "int", "two, so a checkpoint torn by a crash has a good one "
                              "beside it; one more pruned checkpoint waits in `.staging/` to be "
                              "written over by the next, through idle spells and restarts "
                              "(counted in `max_disk_gb`; given back before retention prunes "
                              "anything to make room, and by the idle daemon once less is free "
                              "than it holds plus `min_free_disk_mb`)", 1, 1000),
    "loss_spike_factor": Param(3.0, "float", "pause when a step's loss exceeds this many times "
                               "the running average; 0 turns it off (else at least 1)", 0.0, 1e6),
    "loss_spike_window": Param(50, "int", "steps in the running average for the spike check",
                               1, 1_000_000),
    # -- versions and backups --
    "retention": Param(None, "retention", "restic-style rules for what `prune` and the daemon "
                       "(after each file) keep; null means the defaults, sized for years on one "
                       "disk (docs/config.md, Retention)", nullable=True),
    "max_disk_gb": Param(None, "float", "budget for the root's models (current_model, versions, "
                         "checkpoints, backups inside it); null: only free space limits it",
                         0.001, 1e9, nullable=True),
    "done_archive": Param(None, "done_archive", "{\"compress_after_days\": N} gzips done/ data "
                          "files trained more than N days ago (verified; the record keeps the "
                          "sha256 and where it is; `add` re-queues from it); null: off",
                          nullable=True),
    "backup_dir": Param(None, "path", "where backups go (default ROOT/backups); put it on another "
                        "disk, or it is not redundancy", nullable=True),
    "backup_every_files": Param(10, "int", "automatic backup after this many trained files; 0 "
                                "turns it off", 0, 1_000_000),
    "backup_every_hours": Param(24.0, "float", "automatic backup when the last is older; 0 turns "
                                "it off", 0.0, 1e6),
    "backup_max_disk_gb": Param(None, "float", "budget for backup_dir; null: only free space "
                                "limits it", 0.001, 1e9, nullable=True),
    # -- the daemon --
    "settle_seconds": Param(1.0, "float", "a dropped file must keep its size and mtime this long "
                            "before it is taken", 0.0, 3600.0),
    "rescan_seconds": Param(5.0, "float", "inbox rescans catch what inotify missed", 0.1, 3600.0),
    "keep_warm_seconds": Param(120.0, "float", "after the queue empties, the model and AdamW state "
                               "stay in memory this long, so a file dropped meanwhile trains without "
                               "loading them from disk; given back sooner when the daemon pauses, "
                               "config.json changes or less than 10% of the memory holding them "
                               "is free; 0: as soon as it is idle",
                               0.0, 86400.0),
    "max_attempts": Param(3, "int", "a file that crashes training this often goes to failed/ "
                          "(a daemon killed after a new checkpoint of the file since its last "
                          "start, `kill -9` or a power cut, is no failed attempt: it resumes)",
                          1, 1000),
    "min_free_disk_mb": Param(100, "int", "margin kept free beyond one snapshot plus one "
                              "checkpoint", 0, 1 << 30),
    "monitor_port": Param(8080, "int", "live monitor on 127.0.0.1:PORT; 0 turns it off", 0, 65535),
    # -- the quality gate (eval_gate.py) --
    "eval_max_tokens": Param(16384, "int", "tokens of ROOT/eval/ scored per version (shared by "
                             "its files); 0 turns the eval and the gate off. After a file the "
                             "gate scores 10% of the file's tokens (within 5% of its training time; "
                             "at least one row per eval file, at most this), paired with the "
                             "same rows of the version before; the idle daemon completes each "
                             "version's eval to this many tokens", 0, 1 << 34),
    "eval_regression_pct": Param(5.0, "float", "hold a file whose weights raise any eval file's "
                                 "loss by more than this percent over the version before it",
                                 0.0, 1e6),
    "notify_command": Param(None, "str", "shell command run with a JSON document on stdin "
                            "whenever the daemon waits for a person (e.g. notify-send, curl); "
                            "null: none", nullable=True),
    "nproc_per_node": Param(1, "int", "processes per node; more than 1 runs under torchrun (DDP)",
                            1, 1024),
    "locked": Param(["base_model", "max_length", "learning_rate", "dtype", "finetune", "lora_r",
                     "lora_alpha", "lora_target_modules"], "list",
                    "parameters that need `approve-config` to change"),
}

REQUIRED_LOCKED = ("base_model", "max_length", "learning_rate", "dtype")
# Locked whether or not `locked` names them (configs written before adapter mode do not): the
# mode and the adapter's shape decide what every later version is. An approval recorded before
# they existed approved their defaults (locked_names, changed_locked).
ADAPTER_LOCKED = ("finetune", "lora_r", "lora_alpha", "lora_target_modules")
# Keys that ask for quantized (QLoRA) loading: refused with a reason, not taken as unknown.
QUANTIZED_KEYS = ("load_in_4bit", "load_in_8bit", "qlora")
QUANTIZED_REFUSAL = ("4-bit/8-bit loading (QLoRA) is not supported: it needs CUDA and bitsandbytes "
                     "and is not tested here; remove the key (\"finetune\": \"lora\" trains an "
                     "adapter over the full-precision base)")
# the record fields `fields` may rename (validate_data reads records with these names)
MAPPABLE_FIELDS = ("completion", "input", "instruction", "messages", "output", "prompt", "text",
                   "tools")

# Keys of older configs still accepted (every config written before `retention` has them):
# read as retention.<kind>.keep_last (retention.policy), reported by `state_tracker.py`.
OLD_PARAMS: dict[str, Param] = {
    "keep_versions": Param(None, "int", "old name: read as retention.versions.keep_last", 1,
                           1_000_000, nullable=True),
    "keep_backups": Param(None, "int", "old name: read as retention.backups.keep_last", 1,
                          100_000, nullable=True),
}


def default_config(**overrides) -> dict:
    """A fresh config: every parameter at its default, with `overrides` applied."""
    cfg = {"schema_version": SCHEMA_VERSION}
    for name, p in PARAMS.items():
        cfg[name] = json.loads(json.dumps(p.default)) if isinstance(p.default, (list, dict)) \
            else p.default
    cfg.update(overrides)
    return cfg


def _type_error(name: str, p: Param, value) -> str | None:
    if value is None:
        return None if p.nullable else f"{name}: must not be null"
    if p.kind == "bool":
        return None if isinstance(value, bool) else f"{name}: expected true or false, got {value!r}"
    if p.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name}: expected an integer, got {value!r}"
    elif p.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: expected a number, got {value!r}"
        if value != value or value in (float("inf"), float("-inf")):
            return f"{name}: expected a finite number, got {value!r}"
    elif p.kind in ("str", "path"):
        if not isinstance(value, str) or not value.strip():
            return f"{name}: expected a non-empty string, got {value!r}"
    elif p.kind == "fields":
        return _fields_error(name, value)
    elif p.kind == "modules":
        if value == "all-linear":
            return None
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            return (f"{name}: expected \"all-linear\" or a non-empty list of module names "
                    f"(e.g. [\"q_proj\", \"v_proj\"]), got {value!r}")
        return None
    elif p.kind == "choice":
        if value not in p.choices:
            return f"{name}: expected one of {', '.join(p.choices)}, got {value!r}"
    if p.low is not None and isinstance(value, (int, float)) and not (p.low <= value <= p.high):
        return f"{name}: {value!r} is out of range [{p.low:g}, {p.high:g}]"
    return None


def _fields_error(name: str, value) -> str | None:
    if not isinstance(value, dict):
        return f"{name}: expected an object mapping field names, got {value!r}"
    for ours, theirs in value.items():
        if ours not in MAPPABLE_FIELDS:
            return (f"{name}: {ours!r} is not a record field (the keys are the standard names: "
                    f"{', '.join(MAPPABLE_FIELDS)}; the values are your files' names)")
        if not isinstance(theirs, str) or not theirs.strip():
            return f"{name}: {ours!r} must map to a non-empty field name, got {theirs!r}"
    theirs = list(value.values())
    if len(set(theirs)) != len(theirs):
        return f"{name}: one field of your files is mapped to two standard names ({value!r})"
    return None


def validate_config(cfg) -> list[str]:
    """Every problem in a config document, each naming its key (empty list: valid)."""
    if not isinstance(cfg, dict):
        return [f"config: expected a JSON object, got {type(cfg).__name__}"]
    errors = []
    for key in cfg:
        if key == "schema_version" or key in PARAMS or key in OLD_PARAMS:
            continue
        if key in QUANTIZED_KEYS:
            errors.append(f"{key}: {QUANTIZED_REFUSAL}")
            continue
        import difflib  # only on an unknown key
        close = difflib.get_close_matches(key, PARAMS, n=1)
        errors.append(f"{key}: unknown parameter" + (f" (did you mean {close[0]}?)" if close else ""))
    for name, p in {**PARAMS, **OLD_PARAMS}.items():
        if name not in cfg:
            continue
        value = cfg[name]
        if p.kind == "done_archive":
            import done_archive
            errors.extend(done_archive.validate(value, name))
            continue
        if p.kind == "retention":
            if value is not None:
                import retention
                errors.extend(retention.validate_policy(value, name))
            continue
        if p.kind == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                errors.append(f"{name}: expected a list of parameter names, got {value!r}")
                continue
            for v in value:  # an older config's lock on keep_versions/keep_backups stands
                if v not in PARAMS and v not in OLD_PARAMS or v == "locked":
                    errors.append(f"{name}: {v!r} is not a lockable parameter")
            for v in REQUIRED_LOCKED:
                if v not in value:
                    errors.append(f"{name}: must include {v}")
            continue
        msg = _type_error(name, p, value)
        if msg:
            errors.append(msg)
    notify = cfg.get("notify_command")
    if isinstance(notify, str) and notify.strip():
        try:
            shlex.split(notify)
        except ValueError as exc:
            errors.append(f"notify_command: not a shell command line ({exc}): {notify!r}")
    alpha, dropout = cfg.get("lora_alpha"), cfg.get("lora_dropout")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == 0:
        errors.append("lora_alpha: must be greater than 0 (it scales the adapter; 0 trains nothing)")
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and dropout == 1:
        errors.append("lora_dropout: must be below 1 (1 drops every input of the adapter)")
    spike = cfg.get("loss_spike_factor")
    if isinstance(spike, (int, float)) and 0 < spike < 1:  # below the average: every step
        errors.append(f"loss_spike_factor: {spike!r} would pause at every step (it is a factor "
                      "of the running average loss); use 0 (off) or at least 1, e.g. 3")
    return errors


def load_config(root) -> dict:
    """config.json merged over the defaults; raises ConfigError listing every problem."""
    p = Paths(root)
    if not p.config.exists():
        raise GuardrailError("no config.json in the training root", p.root,
                             f"Run `python3 training_daemon.py init --root {shlex.quote(str(p.root))}`.")
    raw = read_json(p.config)
    errors = validate_config(raw) + _keys_given_twice(p.config)
    if errors:
        if model_folder(p.root) is not None:  # --root ROOT/current_model: the model's config
            require_root(p.root)              # (raises, naming the root it belongs to)
        raise ConfigError(errors, p.config)
    cfg = default_config()
    cfg.update(raw)
    return cfg


def _keys_given_twice(path: Path) -> list[str]:
    """A key written twice in config.json (a hand edit that added a line instead of changing
    one): JSON keeps the last, so the file says one value where it reads as the other."""
    twice = []

    def pairs_hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                twice.append(f"{key}: given twice ({json.dumps(seen[key])}, then {json.dumps(value)}); "
                             "keep one")
            seen[key] = value
        return seen
    try:
        json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=pairs_hook)
    except (OSError, ValueError):
        return []  # read_json has said what is wrong
    return twice


def backup_dir(root, cfg: dict) -> Path:
    """Where backups go: config `backup_dir` (relative to the root) or ROOT/backups."""
    p = Paths(root)
    if not cfg.get("backup_dir"):
        return p.default_backups
    path = Path(os.path.expanduser(cfg["backup_dir"]))
    return path if path.is_absolute() else p.root / path


def read_approval(root) -> dict | None:
    """The approval record in `.config.lock`, or None if the config was never approved.

    A corrupt file, or JSON that is not an approval record, is a GuardrailError.
    """
    path = Paths(root).config_lock
    record = read_json(path, default=None)
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("values"), dict)):
        raise GuardrailError("not an approval record", path,
                             f"Approve the config again (with the user's consent): `{APPROVE_COMMAND}`.")
    return record


def approve(root, cfg: dict, by: str = "user") -> dict:
    """Record the current values of the locked parameters as approved."""
    import eval_gate
    record = {"schema_version": SCHEMA_VERSION, "approved_at": utc_now(), "approved_by": by,
              "values": {name: cfg.get(name) for name in locked_names(cfg)},
              "eval_set": eval_gate.fingerprint(root)}  # ROOT/eval/ is frozen like a locked value
    atomic_write_json(Paths(root).config_lock, record)
    return record


def locked_names(cfg: dict) -> list[str]:
    """The parameters that need approval: config `locked` plus ADAPTER_LOCKED."""
    names = cfg.get("locked", REQUIRED_LOCKED)
    names = [n for n in names if isinstance(n, str)] if isinstance(names, (list, tuple)) else []
    return names + [n for n in ADAPTER_LOCKED if n not in names]


class Change(NamedTuple):
    """A locked parameter whose value is not the approved one. `newly`: it was added to
    `locked` after the approval, which recorded no value for it (`old` is None)."""
    name: str
    old: object
    new: object
    newly: bool = False


def changed_locked(root, cfg: dict) -> list[Change]:
    """Locked parameters whose value differs from the approved one: (name, old, new, newly).

    A never-approved config, or one whose `.config.lock` is damaged, reports every locked
    parameter as changed from None: nothing trains until a person approves again.
    """
    try:
        approval = read_approval(root) or {"values": {}}
    except GuardrailError:
        approval = {"values": {}}
    values = approval["values"]
    if "approved_at" in approval:  # approved before adapter mode existed: it approved the defaults
        values = {**{n: PARAMS[n].default for n in ADAPTER_LOCKED}, **values}
    changes = []
    # the parameters locked now, and those locked when approved (taking one out of `locked`
    # in the same edit that changes it must not let the change through unapproved)
    for name in dict.fromkeys([*locked_names(cfg), *(n for n in values if n in PARAMS)]):
        old, new = values.get(name), cfg.get(name)
        if name not in values or json.dumps(old) != json.dumps(new):
            changes.append(Change(name, old, new, "approved_at" in approval and name not in values))
    import eval_gate  # an approval from before the eval set existed approved none: {}
    old_set, new_set = approval.get("eval_set") or {}, eval_gate.fingerprint(root)
    if old_set != new_set:
        changes.append(Change("eval_set", old_set, new_set))
    return changes


def format_change(name: str, old, new, newly: bool = False) -> str:
    if name == "eval_set":  # {name: sha256}: the names and the start of each hash say enough
        def short(v):
            return "{" + ", ".join(f"{k}: {str(h)[:12]}" for k, h in sorted((v or {}).items())) + "}"
        return f"eval_set (ROOT/eval/): {short(old)} -> {short(new)}"
    if newly:  # no approved value to go back to: approve it, or take it out of `locked`
        return f"{name}: newly locked at {json.dumps(new)}, not approved yet"
    return f"{name}: {json.dumps(old)} -> {json.dumps(new)}"


def write_config(root, cfg: dict) -> None:
    errors = validate_config(cfg)
    if errors:
        raise ConfigError(errors, Paths(root).config)
    atomic_write_json(Paths(root).config, cfg)


def describe_params() -> str:
    """Markdown table of every parameter with its default and why (for docs/config.md)."""
    rows = ["| parameter | default | why |", "|---|---|---|"]
    for name, p in PARAMS.items():
        rows.append(f"| `{name}` | `{json.dumps(p.default)}` | {p.why} |")
    return "\n".join(rows) + "\n"
