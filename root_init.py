"""`training_daemon.py init`: a new training root with config.json, current_model/ and v001.

`init_root(root, base)` builds the embedded tiny model (no download) or copies a local
Hugging Face folder after checking that it loads, takes version v001 and approves the
config (docs/design.md, The root). It never replaces an existing current_model/.
`ensure_folders` creates a root's runtime folders, naming any that is a file instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import tempfile
import time
from pathlib import Path

import backup_records
import trainroot
from trainroot import GuardrailError, Paths, resolve_root

STATUS_COMMAND = "python3 state_tracker.py --check"


def _chmod_tree(folder: Path, file_mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """Normal read permissions (safetensors 0.8 writes 0600)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)


def _empty_dir(path: Path) -> bool:
    """A real folder (not a link) with nothing in it."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def ensure_folders(p: Paths) -> None:
    """Create the root's folders; one that is a file (someone's data named `high`, say) is
    an error naming it, never a bare `File exists`."""
    if os.path.lexists(p.root) and not p.root.is_dir():
        raise GuardrailError("the training root is not a folder", p.root,
                             "Point --root (or $TRAINING_ROOT) at a folder, e.g. "
                             "`python3 training_daemon.py init --root ~/train`.")
    for d in p.runtime_dirs():
        if os.path.lexists(d) and not d.is_dir():
            rel = d.relative_to(p.root)
            kind = "a file" if os.path.isfile(d) else "not a folder (a link or special file)"
            aside = f"{d}.jsonl" if d.parent in (p.root / "inbox", p.root) and \
                str(rel).startswith("inbox") else f"{d}.aside"
            raise GuardrailError(
                f"{rel} is {kind}" + (", not a folder" if kind == "a file" else ""), d,
                f"Move it aside (e.g. `mv {shlex.quote(str(d))} {shlex.quote(aside)}`), then "
                "run the command again; the folder is created anew.")
    p.ensure()


def restore_config(p: Paths) -> dict | None:
    """config.json lost from a root that has versions: write back the config the newest
    version recorded (the one it trained with). None when no version recorded a valid one.

    Its approval is not touched: a locked value that differs from what `.config.lock`
    approved shows up as `name: old -> new`, as after any edit.
    """
    import model_versioner
    import training_config
    for rec in reversed(model_versioner.list_versions(p.root)):
        cfg = rec.get("config")
        if isinstance(cfg, dict) and not training_config.validate_config(cfg):
            with trainroot.FileLock(p.lock("config"), "init: restore config.json"):
                if os.path.lexists(p.config):  # raced with someone putting it back
                    return None
                training_config.write_config(p.root, cfg)
            return {"ok": True, "root": str(p.root), "restored_config_from": rec.get("id"),
                    "current_model": str(p.current_model)}
    return None


def _refuse_over_a_backup(p: Paths) -> None:
    """A root that lost current_model (and its versions) but has a verified backup: init
    would start a new random model beside the trained one; restoring is what is meant."""
    import backup_manager
    try:
        b = backup_manager.latest_backup(p.root)
        bdir = backup_manager.backups_dir(p.root)
        if b is None:  # made before backup_dir changed: still this root's
            b = backup_records.latest_earlier_backup(p.root)
            bdir = backup_records.earlier_folder(p.root) or bdir
    except (GuardrailError, OSError):
        return
    if b:
        import cli_guard
        shown = cli_guard.unless_found(p.root)  # pasted: this root
        raise GuardrailError(
            f"current_model is gone but a verified backup of it exists ({b['id']}, step "
            f"{b.get('global_step')}, in {os.path.dirname(b['path'])}); init would start a new "
            "random model instead", p.root,
            cli_guard.with_root(
                f"Bring it back with `python3 backup_manager.py restore {b['id']}` (then `python3 "
                "model_versioner.py snapshot --note restored`). To start a new model anyway, first "
                f"move the backups aside: `mv {shlex.quote(str(bdir))} "
                f"{shlex.quote(str(bdir) + '.old')}`.", shown))


def _refuse_over_versions(p: Paths) -> None:
    """A root that lost current_model but kept its versions: init would start a new random
    model as the newest version (global_step back to 0), and `restore latest` would then
    bring back that one; restoring the version current_model was is what is meant."""
    import versions_index
    try:
        if not any(versions_index.version_number(name) for name in os.listdir(p.versions)):
            return  # (nothing written into a root init may still refuse)
        latest = versions_index.VersionsIndex(p.root).latest()
    except (GuardrailError, OSError):
        return
    if not latest:
        return
    import cli_guard
    was = versions_index.last_published(p.root, latest)
    shown = cli_guard.unless_found(p.root)  # pasted: this root
    raise GuardrailError(
        f"current_model is gone but its versions are here (it was {was}; the latest is "
        f"{latest}); init would start a new random model as a newer version instead", p.root,
        cli_guard.with_root(
            f"Bring it back with `python3 model_versioner.py restore {was}` (under a second). "
            "To start a new model anyway, first move the versions aside: "
            f"`mv {shlex.quote(str(p.versions))} {shlex.quote(str(p.versions) + '.old')}`.", shown))


def init_root(root, base: str = "tiny") -> dict:
    """Create config.json, current_model/ and version v001 in `root`, and approve the config.

    `base` is "tiny" (a small model built locally, no download) or the path of a local
    Hugging Face causal-LM folder, which is copied after checking that it loads.
    Refuses, changing nothing, when `root` already has a current_model/ (and config.json;
    a root that only lost its config.json gets back the one its newest version recorded).
    """
    p = Paths(resolve_root(root))
    if (inside := trainroot.enclosing_root(p.root)) is not None:
        owner, managed = inside
        raise GuardrailError(
            f"{p.root} is inside {managed.name}/ of the training root {owner}, which only the "
            "product writes: a root there would be taken for its data or versions", p.root,
            "Make the new root in a folder of its own, beside it: `python3 training_daemon.py "
            f"init --root {shlex.quote(str(owner.parent / 'NEW_ROOT'))}`.")
    if p.config.is_symlink() and not p.config.exists():  # init never replaces a link of yours
        raise GuardrailError(
            f"config.json is a link to {os.readlink(p.config)}, which is not there (a disk "
            "not mounted?)", p.config,
            "Mount what it points into; or replace the link (`rm "
            f"{shlex.quote(str(p.config))}`), then run `python3 training_daemon.py init --root "
            f"{shlex.quote(str(p.root))}`, which writes back the config the newest version "
            "trained with.")
    if os.path.lexists(p.current_model) and not os.path.lexists(p.config) and \
            (restored := restore_config(p)):
        return restored
    if not str(base).strip():  # Path("") is the current folder: never copy that by accident
        raise trainroot.UsageError("--base is empty", "python3 training_daemon.py init",
                                   "Pass --base tiny or the path of a local Hugging Face model folder.")
    if _empty_dir(p.current_model):  # nothing to keep, but init still never removes it
        raise GuardrailError(
            "current_model exists but is empty (no model in it); init never replaces it",
            p.current_model, f"Remove the empty folder with `rmdir {shlex.quote(str(p.current_model))}`, "
            f"then run `python3 training_daemon.py init --root {shlex.quote(str(p.root))}` again.")
    if not os.path.lexists(p.current_model):
        _refuse_over_versions(p)
        _refuse_over_a_backup(p)
    elif _cut_short(p):  # an init killed between publishing the model and its first version
        return _finish(p)
    if os.path.lexists(p.current_model):
        raise GuardrailError(
            "current_model already exists; init never replaces a model", p.current_model,
            f"Check it with `{STATUS_COMMAND}`; to go back to a version use "
            f"`python3 model_versioner.py restore V --root {p.root}`.")
    if base != "tiny":
        src = Path(base).expanduser().resolve()
        if not src.is_dir():
            raise GuardrailError("base model folder not found", src,
                                 "Pass --base tiny or the path of a local Hugging Face model folder.")
        base_model = str(src)
    else:
        src, base_model = None, "tiny"

    import training_config
    if p.config.exists():  # left by an interrupted init: keep the user's settings if they match
        cfg = training_config.load_config(p.root)
        if cfg.get("base_model") != base_model:
            raise GuardrailError(
                f"config.json already names base_model {cfg.get('base_model')!r}, not {base_model!r}",
                p.config, f"Run init with --base {cfg.get('base_model')}, or move config.json aside.")
    else:
        cfg = training_config.default_config(base_model=base_model)

    ensure_folders(p)
    with trainroot.FileLock(p.lock("daemon"), "init"):
        if os.path.lexists(p.current_model):  # raced with another init
            raise GuardrailError("current_model already exists; init never replaces a model",
                                 p.current_model, f"Check it with `{STATUS_COMMAND}`.")
        import model_versioner
        import training_engine  # the only torch import, paid here and only here
        for old in p.staging.glob("init-*"):  # a killed init's copy (inits hold this lock)
            shutil.rmtree(old, ignore_errors=True)
        kept = _keep_old_checkpoints(p)
        staged = Path(tempfile.mkdtemp(prefix="init-", dir=p.staging))
        model_dir = staged / "model"
        try:
            if src is None:
                training_engine.build_tiny_model(model_dir)
            else:
                training_engine.copy_base_model(src, model_dir)  # checks that it loads first
            _chmod_tree(model_dir)
            model_versioner.write_manifest(model_dir)
            positions = training_engine.model_max_positions(
                trainroot.read_json(model_dir / "config.json", default={}))
            if not p.config.exists() and positions and cfg["max_length"] > positions:
                cfg["max_length"] = positions  # a row longer than the model's positions cannot train
            if not p.config.exists():  # only once the model is built: a failed init leaves none
                training_config.write_config(p.root, cfg)
            model_versioner.publish_model(p.root, model_dir, reason="init")
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        version = model_versioner.create_version(p.root, "init")
        approval = training_config.approve(p.root, cfg, by="init")
    return dict(_made(p, cfg, version[0], approval),  # create_version: (id, created)
                checkpoints_kept_in=str(kept) if kept else None)


def _keep_old_checkpoints(p: Paths) -> Path | None:
    """The checkpoints a model trained here before left (init over a root whose
    current_model and versions were lost: they may hold the last copy of its weights), moved
    whole into `.attic/` before the new model trains: its checkpoints take the same step
    names and would be written over them."""
    try:
        if not any(os.scandir(p.checkpoints)):
            return None
    except OSError:
        return None
    dst = p.root / ".attic" / f"checkpoints-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(p.checkpoints, dst)
    p.checkpoints.mkdir()
    trainroot.fsync_dir(p.root)
    return dst


def _made(p: Paths, cfg: dict, vid: str, approval: dict) -> dict:
    """init's result, with the chat rendering chat files will get (said now rather than at
    the first file)."""
    import training_engine
    try:
        chat = training_engine.describe_chat_rendering(p.current_model, cfg.get("chat_template"), p.root)
    except Exception as exc:  # only a report: the root is made, whatever the tokenizer says
        chat = {"rendering": None, "error": f"{exc.__class__.__name__}: {exc}"}
    return {"ok": True, "root": str(p.root), "base_model": cfg.get("base_model"),
            "current_model": str(p.current_model), "version": vid,
            "approved": approval["values"], "chat": chat}


def _cut_short(p: Paths) -> bool:
    """current_model as an init publishes it, with none of what init does next: no version,
    no approval, nothing trained (step 0, done/ empty), config.json written by that init."""
    import versions_index
    if not p.config.exists() or os.path.lexists(p.config_lock):
        return False
    try:
        if any(versions_index.version_number(n) for n in os.listdir(p.versions)):
            return False
        if any(not n.startswith(".") for n in os.listdir(p.done)):
            return False
    except FileNotFoundError:
        pass
    try:
        state = trainroot.read_json(p.current_model / "trainer_state.json", default={})
    except GuardrailError:
        return False
    return isinstance(state, dict) and state.get("global_step") == 0 and \
        os.path.isfile(p.current_model / ".manifest.json")


def _finish(p: Paths) -> dict:
    """What an init killed after publishing current_model left undone: version v001 and the
    approval of the config.json it wrote (no locked value was ever approved otherwise)."""
    import model_versioner
    import training_config
    cfg = training_config.load_config(p.root)
    with trainroot.FileLock(p.lock("daemon"), "init"):
        version = model_versioner.create_version(p.root, "init")
        approval = training_config.approve(p.root, cfg, by="init (finishing one cut short)")
    return _made(p, cfg, version[0], approval)
