"""The lab's report: report.md, PNG plots and a summary table, all computed from a pipeline's results.

Nothing here is typed in: every number comes from `results` (what each step of trainers/pipeline.py
returned) or from the runs' metrics.jsonl files.
"""

from __future__ import annotations

import io

from instructgpt_jax import metrics, paths
from instructgpt_jax.lab.tasks import FEATURES, GOLD_WEIGHTS

MODELS = ("SFT", "PPO", "PPO-ptx")
PAPER = {
  "agreement": "72.6 ± 1.5% (training labelers), 77.3 ± 1.3% (held-out)",
  "rm_accuracy": "72.4 ± 0.4% (held-out comparisons), 69.6 ± 0.9% (held-out labelers)",
  "win_rate": "InstructGPT preferred to the 175B SFT baseline 73.4 ± 2% of the time (to 175B GPT-3: 85 ± 3%)",
}


def _rows(workdir: str, stage: str) -> list[dict]:
  return metrics.read_rows(paths.join(workdir, stage))


def headline(results: dict) -> dict[str, float]:
  """The few numbers the command line prints last."""
  e = results["evaluation"]
  return {
    "win_rate_ppo_ptx_vs_sft": e["win_rate_PPO-ptx"],
    "win_rate_ppo_vs_sft": e["win_rate_PPO"],
    "gold_sft": e["gold_SFT"],
    "gold_ppo_ptx": e["gold_PPO-ptx"],
    "rm_accuracy_held_out_labelers": results["rm"]["eval_accuracy"],
    "labeler_agreement": results["labels"]["agreement_held_out_labelers"],
    "alignment_tax_ppo": results["ppo"]["eval_ptx_loss"] - results["ppo"]["eval_ptx_loss_sft"],
    "alignment_tax_ppo_ptx": results["ppo_ptx"]["eval_ptx_loss"] - results["ppo_ptx"]["eval_ptx_loss_sft"],
  }


def _plots(workdir: str, results: dict) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  made = []
  # Reward against KL along each PPO run (Figure-style: what the RM score costs in divergence).
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for stage, label in (("ppo", "PPO (γ = 0)"), ("ppo_ptx", "PPO-ptx (γ = 27.8)")):
    rows = [r for r in _rows(workdir, stage) if "kl" in r]  # training rows (not an evaluation of the start)
    ax.plot([r["kl"] for r in rows], [r["score"] for r in rows], ".-", label=label, alpha=0.8)
  ax.set(xlabel="KL to the SFT model (nats per response)", ylabel="RM score (minus bias)", title="Reward vs KL")
  ax.legend()
  made.append(_save(fig, workdir, "reward_vs_kl.png"))

  # Win rates against SFT, judged by the held-out labelers, with 95% intervals.
  e = results["evaluation"]
  fig, ax = plt.subplots(figsize=(4, 3.5))
  names = ("PPO", "PPO-ptx")
  rates = [e[f"win_rate_{n}"] for n in names]
  lows = [e[f"win_rate_{n}"] - e[f"win_rate_{n}_interval"][0] for n in names]
  highs = [e[f"win_rate_{n}_interval"][1] - e[f"win_rate_{n}"] for n in names]
  ax.bar(names, rates, yerr=[lows, highs], capsize=6, color=["tab:orange", "tab:green"])
  ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
  ax.set(ylim=(0, 1), ylabel="preferred to SFT", title="Held-out labelers' preference")
  made.append(_save(fig, workdir, "win_rates.png"))

  # Learning curves of every stage.
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
  for ax, stage, key, title in (
    (axes[0], "pretrain", "loss", "pretraining loss"),
    (axes[1], "sft", "loss", "SFT loss"),
    (axes[2], "rm", "accuracy", "RM pairwise accuracy (train)"),
  ):
    rows = _rows(workdir, stage)
    ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
    ax.set(title=title, xlabel="step")
  for stage, label in (("ppo", "PPO"), ("ppo_ptx", "PPO-ptx")):
    rows = [r for r in _rows(workdir, stage) if "score" in r]
    axes[3].plot([r["step"] for r in rows], [r["score"] for r in rows], label=label)
  axes[3].set(title="RM score of samples", xlabel="PPO iteration")
  axes[3].legend()
  made.append(_save(fig, workdir, "learning_curves.png"))
  return made


def _save(fig, workdir: str, name: str) -> str:
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  paths.write_bytes(paths.join(workdir, name), png.getvalue())
  import matplotlib.pyplot as plt

  plt.close(fig)
  return name


def write(workdir: str, results: dict) -> str:
  """Writes report.md and the plots into `workdir`; returns the summary table for stdout."""
  e, labels, rm = results["evaluation"], results["labels"], results["rm"]
  plots = _plots(workdir, results)
  pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
  interval = lambda n: f"[{pct(e[f'win_rate_{n}_interval'][0])}, {pct(e[f'win_rate_{n}_interval'][1])}]"  # noqa: E731
  tax = {n: results[n]["eval_ptx_loss"] - results[n]["eval_ptx_loss_sft"] for n in ("ppo", "ppo_ptx")}
  summary = "\n".join(
    [
      "== the InstructGPT lab: results ==",
      f"  held-out labelers prefer PPO-ptx to SFT   {pct(e['win_rate_PPO-ptx'])}  95% interval {interval('PPO-ptx')}",
      f"  held-out labelers prefer PPO to SFT       {pct(e['win_rate_PPO'])}  95% interval {interval('PPO')}",
      f"  gold quality  SFT / PPO / PPO-ptx         "
      f"{e['gold_SFT']:.3f} / {e['gold_PPO']:.3f} / {e['gold_PPO-ptx']:.3f}",
      f"  RM accuracy (held-out labelers)           {pct(rm['eval_accuracy'])}",
      f"  labeler agreement (training / held-out)   {pct(labels['agreement_training_labelers'])} / "
      f"{pct(labels['agreement_held_out_labelers'])}",
      f"  pretraining loss change  PPO / PPO-ptx    {tax['ppo']:+.3f} / {tax['ppo_ptx']:+.3f} nats per token",
      f"  report: {paths.join(workdir, 'report.md')}",
    ]
  )
  constraint_rows = []
  for k in sorted(e["correct_by_constraints_SFT"], key=int):
    cells = " | ".join(pct(e[f"correct_by_constraints_{n}"][k]) for n in ("SFT", "PPO", "PPO-ptx"))
    constraint_rows.append(f"| {k} | {cells} |")
  lines = [
    "# The InstructGPT lab: results",
    "",
    "Every number below was computed by this run (`trainers/pipeline.py`); the paper's figures are given",
    "for comparison of shape only: the lab is a tiny model in a generated world.",
    "",
    "## Human-evaluation analogue: held-out labelers compare each model's response with SFT's",
    "",
    f"On {e['prompts']} held-out prompts, three held-out labelers (never used for training) each chose between",
    "the two responses; the 95% interval resamples prompts.",
    "",
    "| model | preferred to SFT | 95% interval | gold win rate | gold quality | correct |",
    "|---|---|---|---|---|---|",
    f"| SFT | - | - | - | {e['gold_SFT']:.3f} | {pct(e['correct_SFT'])} |",
    *(
      f"| {n} | {pct(e[f'win_rate_{n}'])} | {interval(n)} | {pct(e[f'gold_win_rate_{n}'])} | "
      f"{e[f'gold_{n}']:.3f} | {pct(e[f'correct_{n}'])} |"
      for n in ("PPO", "PPO-ptx")
    ),
    "",
    f"Paper: {PAPER['win_rate']}.",
    "",
    "## The reward model against the labelers",
    "",
    "| | this run | paper |",
    "|---|---|---|",
    f"| RM accuracy on comparisons by held-out labelers | {pct(rm['eval_accuracy'])} | {PAPER['rm_accuracy']} |",
    f"| agreement between two training labelers | {pct(labels['agreement_training_labelers'])} | "
    f"{PAPER['agreement']} |",
    f"| agreement between two held-out labelers | {pct(labels['agreement_held_out_labelers'])} | |",
    f"| labeled prompts (train / held-out) | {labels['train_prompts']} / {labels['eval_prompts']} | 33,207 / 17,887 |",
    "",
    "## The alignment tax: pretraining loss on held-out prose, after RL",
    "",
    "| run | pretraining loss | SFT's | change |",
    "|---|---|---|---|",
    *(
      f"| {label} | {results[n]['eval_ptx_loss']:.3f} | {results[n]['eval_ptx_loss_sft']:.3f} | {tax[n]:+.3f} |"
      for n, label in (("ppo", "PPO (γ = 0)"), ("ppo_ptx", "PPO-ptx (γ = 27.8)"))
    ),
    "",
    "## What the labelers judge: each feature of the gold quality, averaged over the held-out responses",
    "",
    "| feature (gold weight) | SFT | PPO | PPO-ptx |",
    "|---|---|---|---|",
    *(
      f"| {k} ({GOLD_WEIGHTS[k]:.2f}) | "
      + " | ".join(pct(e[f"features_{n}"][k]) for n in ("SFT", "PPO", "PPO-ptx"))
      + " |"
      for k in FEATURES
    ),
    "",
    "## Success by number of constraints in the prompt (exact correctness)",
    "",
    "| constraints | SFT | PPO | PPO-ptx |",
    "|---|---|---|---|",
    *constraint_rows,
    "",
    "## Plots",
    "",
    *(f"![{name}]({name})" for name in plots),
    "",
    "Samples: `evaluation/samples.jsonl` (every held-out prompt with the three models' responses and gold scores);",
    "the PPO runs dump samples against SFT in `ppo*/samples/`.",
  ]
  paths.write_text(paths.join(workdir, "report.md"), "\n".join(lines) + "\n")
  return summary


# ------------------------------------------------------------------------------------------ the comparison


COMPARE_COLUMNS = (
  "method",
  "preferred to SFT",
  "95% interval",
  "gold quality",
  "KL to SFT",
  "Δ pretraining loss",
  "wall time",
)


def comparison_rows(results: dict) -> list[dict[str, str]]:
  """The comparison table's rows (configs/pipeline.py:compare), every cell from `results`."""
  e, c = results["evaluation"], results["compare"]
  pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
  minutes = lambda s: "-" if s is None else f"{s / 60:.1f} min"  # noqa: E731
  rows = []
  for name, m in c["methods"].items():
    trained = name != "SFT"
    rows.append(
      {
        "method": name,
        "preferred to SFT": pct(e[f"win_rate_{name}"]) if trained else "-",
        "95% interval": (
          f"[{pct(e[f'win_rate_{name}_interval'][0])}, {pct(e[f'win_rate_{name}_interval'][1])}]" if trained else "-"
        ),
        "gold quality": f"{e[f'gold_{name}']:.3f}",
        "KL to SFT": f"{m['kl']:.2f}",
        "Δ pretraining loss": f"{m['pretraining_loss_change']:+.3f}",
        "wall time": minutes(m["wall_time_s"]),
      }
    )
  point = next(p for p in c["best_of_n"] if "win_rate" in p)
  low, high = point["win_rate_interval"]
  rows.append(
    {
      "method": f"best-of-{point['n']} (SFT + RM)",
      "preferred to SFT": pct(point["win_rate"]),
      "95% interval": f"[{pct(low)}, {pct(high)}]",
      "gold quality": f"{point['gold']:.3f}",
      "KL to SFT": f"{point['kl']:.2f}",
      "Δ pretraining loss": "+0.000",  # the SFT model's own weights
      "wall time": minutes(c["best_of_n_wall_time_s"]) + " (all n)",
    }
  )
  return rows


def _overoptimization_plot(workdir: str, results: dict, rl_stages: dict[str, str]) -> str:
  """Gold quality and the RM's score against √KL (Gao et al. 2022): along each RL run (its evaluations, KL
  from the same iteration's rollouts; 0 at the start) and for best-of-n from the SFT model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
  for stage, label in rl_stages.items():
    rows = [r for r in _rows(workdir, stage) if "eval_gold" in r]
    root_kl = [max(r.get("kl", 0.0), 0.0) ** 0.5 for r in rows]
    axes[0].plot(root_kl, [r["eval_gold"] for r in rows], ".-", label=label)
    axes[1].plot(root_kl, [r["eval_rm_score"] for r in rows], ".-", label=label)
  bon = results["compare"]["best_of_n"]
  root_kl = [p["kl"] ** 0.5 for p in bon]
  axes[0].plot(root_kl, [p["gold"] for p in bon], "k^--", label="best-of-n")
  axes[1].plot(root_kl, [p["proxy"] for p in bon], "k^--", label="best-of-n")
  axes[0].set(xlabel="√KL to SFT (√nats)", ylabel="gold quality", title="Gold quality")
  axes[1].set(xlabel="√KL to SFT (√nats)", ylabel="RM score (minus bias)", title="Proxy: the RM")
  axes[0].legend(fontsize=8)
  return _save(fig, workdir, "overoptimization.png")


def write_comparison(workdir: str, results: dict, rl_stages: dict[str, str]) -> str:
  """Writes compare.md and overoptimization.png into `workdir`; returns the table for stdout. rl_stages: the
  RL runs' stage folders and their names in the table."""
  plot = _overoptimization_plot(workdir, results, rl_stages)
  table = metrics.markdown_table(COMPARE_COLUMNS, comparison_rows(results))
  c = results["compare"]
  lines = [
    "# The lab's comparison: PPO-ptx and what came after it, from the same SFT model, RM and labelers",
    "",
    f"Held-out prompts: {c['prompts']}. Win rates: three held-out labelers against the SFT model's response",
    "(95% interval by resampling prompts). KL to SFT: Σ_t log π(y_t) − log π_SFT(y_t) of each model's own",
    "samples on those prompts, averaged (best-of-n: log n − (n − 1)/n). Δ pretraining loss: on held-out",
    "prose against the SFT model's. Wall time: the method's training stage on this machine.",
    "",
    table,
    "",
    "## Over-optimization (Gao et al. 2022)",
    "",
    "Gold quality and the RM's score against √KL: each RL run at its evaluations (the EMA policy's samples;",
    "KL of the same iteration's rollouts, so of the raw policy), and best-of-n from the SFT model at",
    ", ".join(f"n = {p['n']}" for p in c["best_of_n"]) + ".",
    "",
    "| n | √KL | RM score | gold quality |",
    "|---|---|---|---|",
    *(f"| {p['n']} | {p['kl'] ** 0.5:.2f} | {p['proxy']:.3f} | {p['gold']:.3f} |" for p in c["best_of_n"]),
    "",
    f"![{plot}]({plot})",
  ]
  paths.write_text(paths.join(workdir, "compare.md"), "\n".join(lines) + "\n")
  return "== the lab's comparison ==\n" + table + f"\n  {paths.join(workdir, 'compare.md')}"
