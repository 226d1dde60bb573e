"""What a checkpoint holds besides the host's files, when it is complete, and which one a resume uses.

The host (transformers' Trainer 5.x, also under Axolotl) writes `checkpoint-N` in place, with no temporary
folder: the model or adapter, optimizer, scheduler, scaler, RNG states, then `trainer_state.json`, then it
deletes the checkpoints beyond `save_total_limit`. The trainer writes its own state first, one file
`sd_<name>_state.pt` per entry of `SelfDistillationTrainer.checkpoint_state()`, each atomically
(`files.open_atomic`). So `trainer_state.json`, the host's last file, marks a complete checkpoint: a process
killed anywhere during the save leaves a folder without it (or with a cut-off one, which does not parse).

On resume a checkpoint is complete when `trainer_state.json` parses and every state file is there. An
incomplete one is an error naming the missing file and the previous complete checkpoint; where the host
picked the last checkpoint itself (Axolotl's `auto_resume_from_checkpoints`, `train(resume_from_checkpoint=True)`)
the previous complete one is used instead, with a warning naming both. The plugin's state is never silently
started over while the adapter and optimizer continue.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from sd_plugin.files import open_atomic

LOG = logging.getLogger("sd_plugin")
HOST_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: the host writes it last
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' and Axolotl's rule for checkpoint folders


def state_file(name: str) -> str:
    """The file of one `checkpoint_state()` entry: `teacher` -> `sd_teacher_state.pt`."""
    return f"sd_{name}_state.pt"


@dataclass
class StateHooks:
    """`state_dict` / `load_state_dict` made of two functions, for state kept in plain attributes."""

    state_dict: Callable[[], dict]
    load_state_dict: Callable[[dict], None]


def save_state(folder: str | os.PathLike, states: dict) -> None:
    """Write each entry's `state_dict()` to `folder/sd_<name>_state.pt`, atomically.

    A stale `trainer_state.json` in `folder` (a run resumed from an earlier checkpoint saves this step again)
    is removed first, so that the folder is not complete again before the host has rewritten every file."""
    os.makedirs(folder, exist_ok=True)
    stale = os.path.join(folder, HOST_STATE_FILE)
    if os.path.exists(stale):
        os.unlink(stale)
    for name, owner in states.items():
        with open_atomic(os.path.join(folder, state_file(name))) as handle:
            torch.save(owner.state_dict(), handle)


def load_state(folder: str | os.PathLike, states: dict) -> None:
    """Load each entry from `folder/sd_<name>_state.pt`; a file that does not fit this run names itself."""
    for name, owner in states.items():
        path = os.path.join(folder, state_file(name))
        try:
            owner.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"{path}: cannot resume from it ({error}); was the checkpoint written with other "
                             "teacher options?") from None


def missing_files(folder: str | os.PathLike, names) -> list[str]:
    """What `folder` lacks to be a complete checkpoint (empty: complete)."""
    missing = []
    try:
        with open(os.path.join(folder, HOST_STATE_FILE), encoding="utf-8") as handle:
            json.load(handle)
    except FileNotFoundError:
        missing.append(HOST_STATE_FILE)
    except (OSError, ValueError):
        missing.append(f"a readable {HOST_STATE_FILE} (it is cut off)")
    missing += [state_file(name) for name in names if not os.path.isfile(os.path.join(folder, state_file(name)))]
    return missing


def checkpoint_folders(output_dir: str | os.PathLike) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, by step (oldest first)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), entry) for entry in os.listdir(output_dir)
             if (match := CHECKPOINT_NAME.match(entry)) and os.path.isdir(os.path.join(output_dir, entry))]
    return [os.path.join(output_dir, entry) for _, entry in sorted(found)]


def previous_complete(checkpoint: str, names) -> str | None:
    """The latest complete checkpoint beside `checkpoint` with a lower step (None: there is none)."""
    match = CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint)))
    step = int(match.group(1)) if match else None
    earlier = [folder for folder in checkpoint_folders(os.path.dirname(os.path.normpath(checkpoint)) or ".")
               if step is None or int(CHECKPOINT_NAME.match(os.path.basename(folder)).group(1)) < step]
    return next((folder for folder in reversed(earlier) if not missing_files(folder, names)), None)


def resolve_resume(checkpoint, output_dir: str, names, auto: bool = False) -> str | None:
    """The checkpoint a resume loads: `checkpoint` itself when complete, else an error, or under `auto` the
    previous complete one (None, a fresh start, when there is none: no checkpoint was ever finished).

    `checkpoint`: None / False (no resume), True (the last `checkpoint-N` of `output_dir`, with `auto`'s
    fallback; an error when there is none, as transformers does) or a folder. `names`: the state entries
    (`checkpoint_state()`'s keys) whose files a complete checkpoint holds.
    """
    if checkpoint is None or checkpoint is False:
        return None
    names = list(names)
    if checkpoint is True:
        folders = checkpoint_folders(output_dir)
        if not folders:
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
        checkpoint, auto = folders[-1], True
    checkpoint = str(checkpoint)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"resume_from_checkpoint: no such folder {checkpoint}")
    missing = missing_files(checkpoint, names)
    if not missing:
        return checkpoint
    previous = previous_complete(checkpoint, names)
    what = (f"checkpoint {checkpoint} is incomplete: it has no {' and no '.join(missing)} (the run stopped "
            "while saving it, or an older sd-plugin wrote it)")
    if auto and previous is not None:
        LOG.warning("%s; resuming from the previous complete checkpoint %s instead", what, previous)
        return previous
    if auto:
        LOG.warning("%s, and no earlier checkpoint is complete: training starts from step 0", what)
        return None
    if previous is not None:
        raise ValueError(f"{what}; resume from the previous complete checkpoint {previous} instead")
    raise ValueError(f"{what}, and no earlier checkpoint beside it is complete: start the run over without "
                     "resume_from_checkpoint")
