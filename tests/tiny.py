"""Builders of tiny, fully offline fixtures for tests: an atomic dataset with titles and images,
a tiny CLIP checkpoint (model + tokenizer + preprocessor config) on disk, and quick configs.

Plain module (not a conftest): ``from tests.tiny import make_atomic_dataset, make_tiny_clip``."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

# Nothing in the test suite may reach the network; set before transformers / huggingface_hub
# are imported (they read these once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO_ROOT / "run_recbole_perpeft.py"
POSTERS_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k-posters" / "images"

WORDS = [
    "the", "blue", "river", "night", "city", "lost", "star", "dark", "king", "love", "war", "road",
    "moon", "sea", "fire", "day", "iron", "red", "last", "gold", "wind", "dream", "ghost", "storm",
]  # fmt: skip


def _title(index: int) -> str:
    # Distinct per item, and only characters the tiny CLIP tokenizer knows.
    return f"{WORDS[index % len(WORDS)]} {WORDS[(index * 7 + 3) % len(WORDS)]} {index}"


def item_token(index: int) -> str:
    """Item tokens are '101', '102', ... so they never coincide with RecBole's internal ids."""
    return str(101 + index)


def make_atomic_dataset(
    root,
    name: str,
    n_users: int = 30,
    n_items: int = 25,
    with_images: bool = True,
    missing_images=(),
    empty_titles=(),
    seed: int = 0,
) -> dict:
    """Write ``<root>/<name>/<name>.inter``, ``<name>.item`` and (``with_images``) one small JPEG
    per item in ``<root>/<name>/images/<item_id>.jpg``; return the config keys for the dataset.

    Every user has 8-12 interactions with distinct items, and every item has at least 5, so
    RecBole's default 5-core filtering (recbole_perpeft/properties/overall.yaml) keeps all of them.
    ``missing_images`` / ``empty_titles``: item tokens written without an image / with an empty title.
    """
    from PIL import Image

    root = Path(root)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = [item_token(i) for i in range(n_items)]

    counts = np.zeros(n_items, dtype=int)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        length = min(8 + u % 5, n_items)
        start = (u * 3) % n_items
        items = [(start + j) % n_items for j in range(length)]  # consecutive: covers items evenly
        rng.shuffle(items)
        for t, i in enumerate(items):
            counts[i] += 1
            lines.append(f"u{u + 1}\t{tokens[i]}\t{1_000_000 + u * 1000 + t}")
    if n_users >= 10 and counts.min() < 5:
        raise AssertionError(f"tiny dataset builder: an item has only {counts.min()} interactions")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")

    item_lines = ["item_id:token\ttitle:token_seq"]
    for i, tok in enumerate(tokens):
        item_lines.append(f"{tok}\t{'' if tok in set(empty_titles) else _title(i)}")
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n")

    image_dir = folder / "images"
    if with_images:
        image_dir.mkdir(exist_ok=True)
        for i, tok in enumerate(tokens):
            if tok in set(missing_images):
                continue
            base = rng.integers(0, 256, size=3)
            pixels = np.empty((40, 36, 3), dtype=np.uint8)
            pixels[:] = base
            pixels[: 10 + i % 20, :, i % 3] = 255 - base[i % 3]  # a band, different per item
            Image.fromarray(pixels).save(image_dir / f"{tok}.jpg", quality=90)

    return {
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "text_field": "title",
        "image_dir": str(image_dir),
    }


def make_varied_title_dataset(root: Path, name: str, n_items: int, untitled=()) -> dict:
    """:func:`make_atomic_dataset` whose titles run from 1 to 12 words (token lengths differ widely: several
    length buckets in a batch); the items in ``untitled`` (tokens) get an empty title."""
    keys = make_atomic_dataset(root, name, n_items=n_items)
    lines = ["item_id:token\ttitle:token_seq"]
    for i in range(n_items):
        words = [WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(1 + (i * 7) % 12)]
        title = "" if item_token(i) in untitled else f"{' '.join(words)} {i}"
        lines.append(f"{item_token(i)}\t{title}")
    (Path(root) / name / f"{name}.item").write_text("\n".join(lines) + "\n")
    return keys


def quick_config(tmp_path, **overrides) -> dict:
    """Keys that keep a run small and inside ``tmp_path`` (checkpoints, caches)."""
    tmp_path = Path(tmp_path)
    config = {
        "epochs": 1,
        "show_progress": False,
        "checkpoint_dir": str(tmp_path / "saved"),
        "cache_dir": str(tmp_path / "cache"),
        "train_batch_size": 8,
        "eval_batch_size": 64,
        "hidden_size": 16,
        "inner_size": 32,
        "n_heads": 2,
        "projector_hidden_size": 32,
        "image_size": 32,
        "text_max_length": 16,
        "worker": 0,
        # The suite's numeric comparisons (1e-5) are fp32's, on every machine; `auto` would pick bf16 on a
        # CPU with AVX512-BF16. bf16 has its own tests (test_precision.py).
        "precision": "fp32",
    }
    config.update(overrides)
    return config


# --- tiny CLIP ----------------------------------------------------------------------------------------

CLIP_CHARS = string.ascii_lowercase + string.digits + "().,:'!&-?"
TINY_MEAN = [0.5, 0.4, 0.3]
TINY_STD = [0.25, 0.2, 0.3]


class TinyClip(NamedTuple):
    path: str
    model: object  # transformers.CLIPModel, in memory (eval mode)
    tokenizer: object  # transformers.CLIPTokenizer


def tiny_clip_vocab() -> dict[str, int]:
    """Character-level BPE vocabulary: every character alone and with CLIP's '</w>' word-end suffix,
    then the special tokens (last, as in the real CLIP vocabulary)."""
    tokens = list(CLIP_CHARS) + [c + "</w>" for c in CLIP_CHARS]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def make_tiny_clip(directory, seed: int = 0) -> TinyClip:
    """A tiny random CLIP saved in ``directory`` with a working CLIPTokenizer and a
    preprocessor_config.json, loadable by ``CLIPModel/CLIPTokenizer.from_pretrained(directory)``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_clip_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (bos, eos) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"]), "tokenizer ignores vocab.json"

    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            # Must be the tokenizer's: CLIP pools the text at the first EOS token.
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_normalize": True,
        "image_mean": TINY_MEAN,
        "image_std": TINY_STD,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return TinyClip(str(directory), model, tokenizer)


# --- models in-process ----------------------------------------------------------------------------------


def build_config(model: str, dataset: str, config_dict: dict):
    from recbole_perpeft.config import Config

    return Config(model=model, dataset=dataset, config_dict=dict(config_dict))


def build_model(model: str, dataset: str, config_dict: dict, seed: int | None = None):
    """Config, dataset, loaders and an initialised model, as quick_start.run builds them
    (no logger set-up, no training). Returns (config, model, train_data, valid_data, test_data)."""
    from recbole.utils import init_seed

    from recbole_perpeft.data import create_dataset, data_preparation
    from recbole_perpeft.utils import get_model

    config = build_config(model, dataset, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    model_class = get_model(config["model"])
    train_data, valid_data, test_data = data_preparation(config, data, model_class)
    init_seed(config["seed"] if seed is None else seed, config["reproducibility"])
    instance = model_class(config, train_data._dataset)
    return config, instance, train_data, valid_data, test_data


# --- the command line --------------------------------------------------------------------------------


def run_script(args, cwd, timeout=600):
    """``run_recbole_perpeft.py ARGS`` in a subprocess, offline, from ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, str(RUN_SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], cwd, log, hold: tuple[str, int] | None = None) -> subprocess.Popen:
    """``run_recbole_perpeft.py ARGS`` started in a subprocess (offline), stdout and stderr to the file
    ``log`` (a pipe nobody reads while the run goes on could fill up and stall it). ``hold=(pattern, epoch)``
    runs it through ``tests/hold_run.py``: it pauses (every rank, in several processes) after the ``pattern``
    -last checkpoint of ``epoch``, where :func:`interrupt_after` with the same pattern and epoch interrupts it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    script = RUN_SCRIPT
    if hold is not None:
        script = REPO_ROOT / "tests" / "hold_run.py"
        env.update(HOLD_PATTERN=hold[0], HOLD_AFTER_EPOCH=str(hold[1]))
    with open(log, "w") as out:
        # Ctrl-C acts as at a terminal even where this process was started in the background (a
        # non-interactive shell's `&` ignores SIGINT, and children inherit that).
        proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)  # fmt: skip
    proc.log = Path(log)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Wait for a :func:`start` ed run; ``stdout`` holds its whole output."""
    proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.log.read_text(), "")


def interrupt_after(proc: subprocess.Popen, checkpoint_dir, pattern: str, epoch: int, sig) -> None:
    """Send ``sig`` as soon as a ``pattern`` -last checkpoint records ``epoch`` done: the run is then
    inside epoch ``epoch + 1`` (or its validation)."""
    import torch

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.log.read_text()[-3000:]
        for path in Path(checkpoint_dir).glob(pattern):
            if torch.load(path, weights_only=True)["epoch"] >= epoch:  # written aside and renamed: never half a file
                proc.send_signal(sig)
                return
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def load_entry_point():
    """run_recbole_perpeft.py as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location("run_recbole_perpeft", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- a trained stage 1 for the grouped models (PerPEFT, group baselines) ---------------------------------

TWO_STAGE_GROUPS = 2


def two_stage_keys(root, data_keys: dict, clip_path: str) -> dict:
    """Tiny sizes, tiny CLIP with both towers adapted (two peft handles), 2 groups, 1 + 1 epochs."""
    return quick_config(
        root,
        **data_keys,
        foundation_model="clip",
        clip_path=clip_path,
        adapt_image_tower=True,
        n_groups=TWO_STAGE_GROUPS,
        topk=[5, 10],
        valid_metric="hit@10",
        stage1_epochs=1,
        stage2_epochs=1,
        learning_rate=1e-3,  # visible parameter moves after a few steps
    )


def table_keys(root, dataset: str) -> dict:
    """two_stage_keys for a reproduce table of real tiny runs (24 users, 20 items): no ``epochs`` (the table sets
    the single-stage rows' from the stages), RecBole's log at WARNING."""
    clip = make_tiny_clip(Path(root) / "clip")
    keys = two_stage_keys(root, make_atomic_dataset(Path(root) / "data", dataset, n_users=24, n_items=20), clip.path)
    keys.pop("epochs")
    return {**keys, "state": "WARNING"}


def build_stage1_env(root, model: str, dataset: str, n_users: int, n_items: int, missing_images=(),
                     empty_titles=()):  # fmt: skip
    """Data, loaders, the trained stage-1 GlobalPEFT (with its checkpoint) and the user groups of a
    two-stage ``model`` on a generated dataset, for a module-scoped fixture."""
    import pytest
    from recbole.utils import init_seed

    from recbole_perpeft.config import Config
    from recbole_perpeft.data import create_dataset, data_preparation
    from recbole_perpeft.two_stage import TwoStageTrainer, group_users
    from recbole_perpeft.utils import get_model

    root = Path(root)
    clip = make_tiny_clip(root / "clip")
    data_keys = make_atomic_dataset(
        root / "data", dataset, n_users=n_users, n_items=n_items,
        missing_images=missing_images, empty_titles=empty_titles,
    )  # fmt: skip
    config_dict = two_stage_keys(root, data_keys, clip.path)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # RecBole's trainer writes log_tensorboard/ under the working directory
        config = Config(model=model, dataset=dataset, config_dict=config_dict)
        init_seed(config["seed"], True)
        data = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, data, get_model(model))
        init_seed(config["seed"], True)
        trainer = TwoStageTrainer(config, get_model(model)(config, train_data._dataset))
        global_model = trainer.stage1(train_data, valid_data, show_progress=False)
        groups = group_users(global_model, train_data._dataset, config)
    global_model.eval()
    assert groups.n_groups == TWO_STAGE_GROUPS and min(groups.sizes()) > 0
    return SimpleNamespace(
        root=root, clip_path=clip.path, data_keys=data_keys, config_dict=config_dict, config=config,
        train_data=train_data, valid_data=valid_data, test_data=test_data, train_dataset=train_data._dataset,
        stage1_trainer=trainer, global_model=global_model, groups=groups,
    )  # fmt: skip


def run_stage2(env, config, saved: bool = True):
    """Stage 2 of ``config["model"]`` through :class:`TwoStageTrainer`, started from ``env``'s stage-1
    GlobalPEFT and groups (``prepare_stage2``: stage 1 is not retrained); records the stage-2 loaders."""
    from recbole_perpeft.two_stage import TwoStageTrainer
    from recbole_perpeft.utils import get_model

    model = get_model(config["model"])(config, env.train_dataset)
    trainer = TwoStageTrainer(config, model)
    trainer.prepare_stage2(env.global_model.state_dict(), env.groups)
    loaders, build_loader = [], trainer.stage2_loader

    def recorded(dataset):
        loaders.append(build_loader(dataset))
        return loaders[-1]

    trainer.stage2_loader = recorded
    best_score, best_valid = trainer.fit(env.train_data, env.valid_data, saved=saved)
    return SimpleNamespace(model=model, trainer=trainer, best_score=best_score, best_valid=best_valid,
                           loaders=loaders, samplers=[loader._sampler for loader in loaders])  # fmt: skip
