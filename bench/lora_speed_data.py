"""The data and models of ``bench/lora_speed.py``: a RecBole dataset of generated users over amazon-scientific's
titles (or generated ones), a real-size CLIP with random weights (``foundation_model: bench_clip``) and a tiny
BERT. Imported by the bench (run as a script, its folder is on ``sys.path``)."""

from __future__ import annotations

import html
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITLE_SOURCES = [ROOT.parent / "shared/datasets/amazon-scientific/items.tsv",
                 ROOT / "dataset/amazon-scientific/amazon-scientific.item"]  # fmt: skip
DATASET = "lora_bench"


def amazon_titles(n: int, rng) -> tuple[list[str], str]:
    for path in TITLE_SOURCES:
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            titles = [html.unescape(t) for t in (line.split("\t", 1)[-1] for line in lines[1:]) if t.strip()]
            if len(titles) >= n:
                return [titles[i] for i in rng.choice(len(titles), n, replace=False)], str(path)
    words = "digital meter gauge sensor cable steel kit pack tester lab stainless 12v usb set pro".split()
    lengths = rng.lognormal(2.3, 0.5, n).clip(2, 40).astype(int)  # product titles: ~10 words, long tail
    return [" ".join(rng.choice(words, k)) + f" {i}" for i, k in enumerate(lengths)], "generated"


def write_dataset(folder: Path, args, rng) -> str:
    """RecBole atomic files: ``users`` users with ``seq_len`` distinct items each, dealt from shuffled copies
    of the catalogue so that every item is bought when users x seq_len >= items (RecBole drops items nobody
    bought); a title and a 64x64 JPEG per item (CLIP's store resizes it)."""
    from PIL import Image

    data = folder / DATASET
    (data / "images").mkdir(parents=True, exist_ok=True)
    titles, source = amazon_titles(args.items, rng)
    lines, stream = ["user_id:token\titem_id:token\ttimestamp:float"], []
    for u in range(args.users):
        bought: list[int] = []
        while len(bought) < args.seq_len:
            if not stream:
                stream = list(rng.permutation(args.items))
            item = stream.pop()
            if item not in bought:
                bought.append(item)
        lines += [f"u{u}\ti{i}\t{u * 1000 + t}" for t, i in enumerate(bought)]
    (data / f"{DATASET}.inter").write_text("\n".join(lines) + "\n")
    clean = [" ".join(t.replace("\t", " ").split()) for t in titles]
    # A field that starts with a double quote is a CSV-quoted one to the loader: quote it whole.
    clean = ['"' + t.replace('"', '""') + '"' if t.startswith('"') else t for t in clean]
    (data / f"{DATASET}.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(
        f"i{i}\t{t}\n" for i, t in enumerate(clean)))  # fmt: skip
    for i in range(args.items):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype="uint8")).save(data / "images" / f"i{i}.jpg")
    return source


def register_bench_clip():
    """``foundation_model: bench_clip``: CLIP from ``CLIPConfig`` with random weights, MiniLM's tokenizer.
    ``clip_path`` names the size (``bench:vit-b32`` or ``bench:tiny``) and keys the caches."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from recbole_perpeft.encoders import register_foundation
    from recbole_perpeft.encoders.base import FoundationModel
    from recbole_perpeft.encoders.clip import OPENAI_MEAN, OPENAI_STD, ClipFoundation
    from recbole_perpeft.encoders.text_image import default_text_encoder_path

    @register_foundation("bench_clip")
    class BenchClip(ClipFoundation):
        def __init__(self, config):
            FoundationModel.__init__(self)
            self.tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
            ids = {
                "bos_token_id": self.tokenizer.cls_token_id,
                "eos_token_id": self.tokenizer.sep_token_id,
                "pad_token_id": self.tokenizer.pad_token_id,
                "vocab_size": max(49408, len(self.tokenizer)),
            }
            text, vision, dim = dict(ids), {}, 512  # CLIPConfig's defaults are ViT-B/32's
            if config["clip_path"] == "bench:tiny":
                size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
                text.update(size, vocab_size=len(self.tokenizer))
                vision.update(size, image_size=32, patch_size=8)
                dim = 16
            torch.manual_seed(0)
            self.clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)).eval()
            self.clip.requires_grad_(False)
            self.text_max_length = min(config["text_max_length"] or 77, 77)
            self.image_size, self.image_mean, self.image_std = vision.get("image_size", 224), OPENAI_MEAN, OPENAI_STD
            self.out_dims = {"text": dim, "image": dim}
            self.cache_ids = {"text": f"clip:{config['clip_path']}:text:{self.text_max_length}",
                              "image": f"clip:{config['clip_path']}:image:{self.image_size}"}  # fmt: skip


def tiny_bert(folder: Path) -> str:
    """A 2-layer BERT with random weights and MiniLM's tokenizer, saved where AutoModel finds it."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recbole_perpeft.encoders.text_image import default_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return str(folder)
