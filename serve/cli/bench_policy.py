"""`imagegen bench policy`: what the prompt policy stage costs a request, side by side:
the shipped policy and a generated one of `--terms` terms (target: under 1 ms p50
per prompt at 10,000 terms), on typical prompts and on the longest one allowed; and
what rendering a template costs (stage 3)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--terms", type=int, default=10_000, help="terms in the generated policy")
    p.add_argument("--prompts", type=int, default=2000, help="prompts checked per row")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(4, 10))) for _ in range(n)]


def _generated(terms: int, rng: random.Random):
    from ..safety.policy import Category, PolicyFile, PromptPolicy

    words = _words(rng, terms)
    phrases = [f"{a} {b}" if i % 5 == 0 else a for i, (a, b) in
               enumerate(zip(words, reversed(words), strict=True))]
    per = len(phrases) // 4
    return PromptPolicy(PolicyFile(version=1, categories={
        f"c{i}": Category(reason=f"r{i}", terms=phrases[i * per:(i + 1) * per])
        for i in range(4)}))


def _time(policy, prompts: list[str]) -> tuple[float, float]:
    lat = []
    for p in prompts:
        t = time.perf_counter()
        policy.check({"prompt": p, "negative_prompt": "blurry, low quality"})
        lat.append(time.perf_counter() - t)
    return statistics.median(lat) * 1e3, statistics.quantiles(lat, n=20)[-1] * 1e3


def run(args: argparse.Namespace, settings) -> int:
    from ..safety.policy import load_policy_file

    rng = random.Random(7)
    t = time.perf_counter()
    big = _generated(args.terms, rng)
    compile_s = time.perf_counter() - t
    shipped = load_policy_file(settings.prompt_policy_file)
    vocab = _words(rng, 500) + ["a", "the", "of", "with", "red", "fox", "at", "dusk"]
    typical = [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 60)))
               for _ in range(args.prompts)]
    longest = [" ".join(rng.choice(vocab) for _ in range(400))[:2000]
               for _ in range(max(50, args.prompts // 10))]
    print(f"\nimagegen bench policy — prompt + negative prompt per check "
          f"(target: p50 < 1 ms at {args.terms} terms); generated policy compiled in "
          f"{compile_s:.2f} s\n")
    print(f"{'policy':<26}{'prompts':<22}{'p50 ms':>9}{'p95 ms':>9}")
    rows = []
    for name, policy in ((f"shipped ({shipped.terms} terms)", shipped),
                         (f"generated ({big.terms} terms)", big)):
        for label, prompts in (("typical (8-60 words)", typical),
                               ("longest (2000 chars)", longest)):
            p50, p95 = _time(policy, prompts)
            print(f"{name:<26}{label:<22}{p50:>9.3f}{p95:>9.3f}")
            rows.append({"policy": name, "prompts": label, "p50_ms": p50, "p95_ms": p95})
    p50, p95 = _render_time(settings, vocab, rng, args.prompts)
    print(f"{'render product-shot@1':<26}{'3 variables':<22}{p50:>9.3f}{p95:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"terms": args.terms, "compile_s": compile_s, "rows": rows,
             "render": {"p50_ms": p50, "p95_ms": p95}}, indent=2))
    return 0


def _render_time(settings, vocab: list[str], rng: random.Random, n: int) -> tuple[float, float]:
    from ..schemas import GenerateRequest
    from ..templates.library import load_library
    from ..templates.render import Styles

    styles = Styles(load_library(settings.styles_dir))
    lat = []
    for _ in range(n):
        req = GenerateRequest(template="product-shot@1", variables={
            "product": " ".join(rng.choice(vocab) for _ in range(4))[:80],
            "background": "black", "angle": rng.randint(0, 90)})
        t = time.perf_counter()
        styles.render(req)
        lat.append(time.perf_counter() - t)
    return statistics.median(lat) * 1e3, statistics.quantiles(lat, n=20)[-1] * 1e3
