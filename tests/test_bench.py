import re

import bench

SMALL = ["--config", "cpu-small", "--batch", "2", "--prompt-len", "16", "--gen-length", "32", "--block-length", "16",
         "--steps", "4", "--mu", "2", "--lora-r", "8"]


def test_bench_runs_every_section_and_writes_its_tables(tmp_path):
    """The harness end to end on LLaDA's real 126,464-token vocabulary with tiny shapes: the sampler table (our exact
    sampler commits the same tokens as the reference-style loop), the log-prob pass, and the GRPO step whose phase
    times add up to its total."""
    out = tmp_path / "bench.md"
    bench.main(SMALL + ["--out", str(out)])
    text = out.read_text()
    exact = next(line for line in text.splitlines() if line.startswith("| ours, exact |"))
    assert exact.rstrip().endswith("| yes |"), exact
    assert "One-step log-prob estimator" in text
    phases = {m[0]: float(m[1]) for m in re.findall(r"^\| (rollout|old_logps|ref_logps|update) \| ([\d.]+) \|", text,
                                                      re.M)}
    assert set(phases) == {"rollout", "old_logps", "ref_logps", "update"}
    total = float(re.search(r"^\| total \(incl. rewards\) \| ([\d.]+) \|", text, re.M)[1])
    assert sum(phases.values()) <= total + 0.02
