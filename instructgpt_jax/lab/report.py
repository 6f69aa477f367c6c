"""The lab's report: report.md, PNG plots and a summary table, all computed from a pipeline's results.

Nothing here is typed in: every number comes from `results` (what each step of stages/pipeline.py
returned) or from the runs' metrics.jsonl files.
"""

from __future__ import annotations

import io

from instructgpt_jax import metrics, paths
from instructgpt_jax.lab.tasks import FEATURES, GOLD_WEIGHTS

MODELS = ("SFT", "PPO", "PPO-ptx")
# Figure 1's models, by the evaluation's name and the name the figure gives; then the PPO-init SFT (not in it).
FIGURE1 = (
  ("GPT", "GPT"),
  ("GPT prompted", "GPT prompted"),
  ("SFT baseline", "SFT"),
  ("PPO", "PPO"),
  ("PPO-ptx", "PPO-ptx (InstructGPT)"),
)
PPO_INIT = ("SFT", "PPO-init SFT (beyond the figure)")
# The headline's names of the win rates against the SFT baseline (fig1_<name>).
FIGURE1_HEADLINE = {
  "GPT": "gpt",
  "GPT prompted": "gpt_prompted",
  "SFT": "ppo_init_sft",
  "PPO": "ppo",
  "PPO-ptx": "ppo_ptx",
}
PAPER = {
  "agreement": "72.6 ± 1.5% (training labelers), 77.3 ± 1.3% (held-out)",
  "rm_accuracy": "72.4 ± 0.4% (held-out comparisons), 69.6 ± 0.9% (held-out labelers)",
  "win_rate": "InstructGPT preferred to the 175B SFT baseline 73.4 ± 2% of the time (to 175B GPT-3: 85 ± 3%)",
}


def _rows(workdir: str, stage: str) -> list[dict]:
  return metrics.read_rows(paths.join(workdir, stage))


def figure1(e: dict) -> list[tuple[str, float, tuple[float, float] | None]]:
  """Figure 1's rows: (name, win rate against the SFT baseline, its 95% interval); the baseline is 0.5, itself."""
  rows = []
  for key, label in (*FIGURE1, PPO_INIT):
    if key == "SFT baseline":
      rows.append((label, 0.5, None))
    else:
      rows.append((label, e[f"baseline_win_rate_{key}"], tuple(e[f"baseline_win_rate_{key}_interval"])))
  return rows


def headline(results: dict) -> dict[str, float]:
  """The few numbers the command line prints last."""
  e = results["evaluation"]
  return {
    **{f"fig1_{name}": e[f"baseline_win_rate_{key}"] for key, name in FIGURE1_HEADLINE.items()},
    "gold_sft_baseline": e["gold_SFT baseline"],
    "win_rate_ppo_ptx_vs_sft": e["win_rate_PPO-ptx"],
    "win_rate_ppo_vs_sft": e["win_rate_PPO"],
    "gold_sft": e["gold_SFT"],
    "gold_ppo_ptx": e["gold_PPO-ptx"],
    "rm_accuracy_held_out_labelers": results["rm"]["eval_accuracy"],
    "labeler_agreement": results["labels"]["agreement_held_out_labelers"],
    "alignment_tax_ppo": results["ppo"]["eval_ptx_loss"] - results["ppo"]["eval_ptx_loss_sft"],
    "alignment_tax_ppo_ptx": results["ppo_ptx"]["eval_ptx_loss"] - results["ppo_ptx"]["eval_ptx_loss_sft"],
  }


def findings(results: dict) -> list[tuple[str, bool, str]]:
  """The paper's findings the lab can test, each as (the finding, whether this run shows it, the numbers):
  a preference shown means its 95% interval is clear of 50%, so "no" can also mean "not resolved"."""
  e, rm, labels = results["evaluation"], results["rm"], results["labels"]
  pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731

  def rate(key: str, name: str) -> str:
    low, high = e[f"{key}_{name}_interval"]
    return f"{pct(e[f'{key}_{name}'])} [{pct(low)}, {pct(high)}]"

  tax = {n: results[n]["eval_ptx_loss"] - results[n]["eval_ptx_loss_sft"] for n in ("ppo", "ppo_ptx")}
  above = lambda key, name: e[f"{key}_{name}_interval"][0] > 0.5  # noqa: E731
  below = lambda key, name: e[f"{key}_{name}_interval"][1] < 0.5  # noqa: E731
  agreement = labels["agreement_held_out_labelers"]
  return [
    (
      "labelers prefer PPO-ptx (InstructGPT) to the SFT baseline (Figure 1; paper 73.4 ± 2%)",
      above("baseline_win_rate", "PPO-ptx"),
      rate("baseline_win_rate", "PPO-ptx"),
    ),
    ("labelers prefer PPO to the SFT baseline", above("baseline_win_rate", "PPO"), rate("baseline_win_rate", "PPO")),
    (
      "labelers prefer the SFT baseline to GPT and to GPT prompted",
      below("baseline_win_rate", "GPT") and below("baseline_win_rate", "GPT prompted"),
      f"GPT {rate('baseline_win_rate', 'GPT')}, GPT prompted {rate('baseline_win_rate', 'GPT prompted')}",
    ),
    (
      "a few-shot prefix makes GPT better (GPT prompted above GPT)",
      e["baseline_win_rate_GPT prompted_interval"][0] > e["baseline_win_rate_GPT_interval"][1],
      f"{pct(e['baseline_win_rate_GPT prompted'])} against {pct(e['baseline_win_rate_GPT'])}",
    ),
    (
      "the pretraining term costs no preference (PPO-ptx's interval reaches PPO's; paper §4.2: \"without "
      'compromising labeler preference scores")',
      e["baseline_win_rate_PPO-ptx_interval"][1] >= e["baseline_win_rate_PPO_interval"][0],
      f"{pct(e['baseline_win_rate_PPO-ptx'])} against {pct(e['baseline_win_rate_PPO'])}",
    ),
    (
      "the pretraining term lowers the alignment tax (PPO-ptx's below PPO's)",
      tax["ppo_ptx"] < tax["ppo"],
      f"{tax['ppo_ptx']:+.3f} against {tax['ppo']:+.3f} nats per token",
    ),
    (
      "the RM agrees with held-out labelers above chance, below their agreement with each other",
      0.5 < rm["eval_accuracy"] < agreement,
      f"{pct(rm['eval_accuracy'])} against {pct(agreement)}",
    ),
  ]


def _plots(workdir: str, results: dict) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  made = []
  # Figure 1: every model against the SFT baseline, judged by the held-out labelers, with 95% intervals.
  rows = figure1(results["evaluation"])
  fig, ax = plt.subplots(figsize=(6.5, 3.5))
  names = [name.replace(" (", "\n(") for name, _, _ in rows]
  rates = [rate for _, rate, _ in rows]
  low = [rate - (ci[0] if ci else rate) for _, rate, ci in rows]
  high = [(ci[1] if ci else rate) - rate for _, rate, ci in rows]
  ax.errorbar(range(len(rows)), rates, yerr=[low, high], fmt="o", capsize=5, color="tab:blue")
  ax.set_xticks(range(len(rows)), names, fontsize=7)
  ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
  ax.set(ylim=(0, 1), ylabel="win rate against SFT", title="Figure 1 in miniature: preferred to the SFT baseline")
  made.append(_save(fig, workdir, "figure1.png"))

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


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def _win_interval(e: dict, name: str) -> str:
  """The 95% interval of `name`'s win rate against the PPO-init SFT, as "[low, high]"."""
  low, high = e[f"win_rate_{name}_interval"]
  return f"[{_pct(low)}, {_pct(high)}]"


def _figure1_interval(c: tuple[float, float] | None) -> str:
  return f"[{_pct(c[0])}, {_pct(c[1])}]" if c else "(the baseline itself)"


def _alignment_tax(results: dict) -> dict[str, float]:
  """Each RL run's pretraining loss on held-out prose minus the SFT model's."""
  return {n: results[n]["eval_ptx_loss"] - results[n]["eval_ptx_loss_sft"] for n in ("ppo", "ppo_ptx")}


def write(workdir: str, results: dict) -> str:
  """Writes report.md and the plots into `workdir`; returns the summary table for stdout."""
  plots = _plots(workdir, results)
  lines = _report_findings(results) + _report_measurements(results, plots)
  paths.write_text(paths.join(workdir, "report.md"), "\n".join(lines) + "\n")
  return _summary(workdir, results)


def _summary(workdir: str, results: dict) -> str:
  """The run's summary for stdout: Figure 1, the findings, the numbers beside them."""
  e, labels, rm = results["evaluation"], results["labels"], results["rm"]
  tax = _alignment_tax(results)
  return "\n".join(
    [
      "== the InstructGPT lab: results ==",
      "  Figure 1: held-out labelers prefer each model to the SFT baseline (95% interval)",
      *(f"    {name:<34} {_pct(rate):>6}  {_figure1_interval(c)}" for name, rate, c in figure1(e)),
      "  the paper's findings in this run:",
      *(f"    {'yes' if held else 'no ':<4} {claim}" for claim, held, _ in findings(results)),
      "  the PPO-init SFT, every RL run's start and KL reference:",
      f"      PPO-ptx preferred to it            {_pct(e['win_rate_PPO-ptx'])}  95% interval "
      f"{_win_interval(e, 'PPO-ptx')}",
      f"      PPO preferred to it                {_pct(e['win_rate_PPO'])}  95% interval {_win_interval(e, 'PPO')}",
      f"  gold quality  SFT baseline / PPO-init SFT / PPO / PPO-ptx   {e['gold_SFT baseline']:.3f} / "
      f"{e['gold_SFT']:.3f} / {e['gold_PPO']:.3f} / {e['gold_PPO-ptx']:.3f}",
      f"  RM accuracy (held-out labelers)           {_pct(rm['eval_accuracy'])}",
      f"  labeler agreement (training / held-out)   {_pct(labels['agreement_training_labelers'])} / "
      f"{_pct(labels['agreement_held_out_labelers'])}",
      f"  pretraining loss change  PPO / PPO-ptx    {tax['ppo']:+.3f} / {tax['ppo_ptx']:+.3f} nats per token",
      f"  report: {paths.join(workdir, 'report.md')}",
    ]
  )


def _report_findings(results: dict) -> list[str]:
  """report.md's first part: Figure 1, the paper's findings, the RL models against their start."""
  e = results["evaluation"]
  return [
    "# The InstructGPT lab: results",
    "",
    "Every number below was computed by this run (`stages/pipeline.py`); the paper's figures are given",
    "for comparison of shape only: the lab is a tiny model in a generated world.",
    "",
    "## Figure 1 in miniature: every model against the SFT baseline",
    "",
    f"On {e['prompts']} held-out prompts, three held-out labelers each chose between the model's response and the",
    "SFT baseline's (App. C.1's recipe at the lab's scale, its checkpoint chosen by the RM's score); the 95%",
    "interval resamples prompts. GPT is the pretrained model; GPT prompted is it with the lab's few-shot prefix",
    "(lab/datasets.py FEW_SHOT_PREFIX); PPO and PPO-ptx start from the PPO-init SFT.",
    "",
    "| model | preferred to the SFT baseline | 95% interval | gold quality | correct |",
    "|---|---|---|---|---|",
    *(
      f"| {label} | {_pct(rate)} | {_figure1_interval(c)} | {e[f'gold_{key}']:.3f} | {_pct(e[f'correct_{key}'])} |"
      for (key, _), (label, rate, c) in zip((*FIGURE1, PPO_INIT), figure1(e))
    ),
    "",
    "Paper (Figure 1, 175B, every win rate against 175B SFT): PPO-ptx 73.4 ± 2%; 175B InstructGPT is preferred",
    "to 175B GPT-3 85 ± 3% of the time and to few-shot-prompted GPT-3 71 ± 4%.",
    "",
    "## What this run reproduces of the paper's findings",
    "",
    'A preference counts as shown when its 95% interval is clear of 50%: "no" may also be "not resolved by one',
    'run" (`--config.seeds=3` pools seeds).',
    "",
    "| finding | this run | numbers |",
    "|---|---|---|",
    *(f"| {claim} | {'yes' if held else 'no'} | {numbers} |" for claim, held, numbers in findings(results)),
    "",
    "## Against the PPO-init SFT: held-out labelers compare each RL model's response with its start's",
    "",
    f"On {e['prompts']} held-out prompts, three held-out labelers (never used for training) each chose between",
    "the two responses; the 95% interval resamples prompts.",
    "",
    "| model | preferred to SFT | 95% interval | gold win rate | gold quality | correct |",
    "|---|---|---|---|---|---|",
    f"| SFT | - | - | - | {e['gold_SFT']:.3f} | {_pct(e['correct_SFT'])} |",
    *(
      f"| {n} | {_pct(e[f'win_rate_{n}'])} | {_win_interval(e, n)} | {_pct(e[f'gold_win_rate_{n}'])} | "
      f"{e[f'gold_{n}']:.3f} | {_pct(e[f'correct_{n}'])} |"
      for n in ("PPO", "PPO-ptx")
    ),
    "",
    f"Paper: {PAPER['win_rate']}.",
    "",
  ]


def _report_measurements(results: dict, plots: list[str]) -> list[str]:
  """report.md's second part: the RM against the labelers, the alignment tax, the gold features, success by
  number of constraints, the plots."""
  e, labels, rm = results["evaluation"], results["labels"], results["rm"]
  tax = _alignment_tax(results)
  return [
    "## The reward model against the labelers",
    "",
    "| | this run | paper |",
    "|---|---|---|",
    f"| RM accuracy on comparisons by held-out labelers | {_pct(rm['eval_accuracy'])} | {PAPER['rm_accuracy']} |",
    f"| agreement between two training labelers | {_pct(labels['agreement_training_labelers'])} | "
    f"{PAPER['agreement']} |",
    f"| agreement between two held-out labelers | {_pct(labels['agreement_held_out_labelers'])} | |",
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
      f"| {k} ({GOLD_WEIGHTS[k]:.2f}) | " + " | ".join(_pct(e[f"features_{n}"][k]) for n in MODELS) + " |"
      for k in FEATURES
    ),
    "",
    "## Success by number of constraints in the prompt (exact correctness)",
    "",
    "| constraints | SFT | PPO | PPO-ptx |",
    "|---|---|---|---|",
    *(
      f"| {k} | " + " | ".join(_pct(e[f"correct_by_constraints_{n}"][k]) for n in MODELS) + " |"
      for k in sorted(e["correct_by_constraints_SFT"], key=int)
    ),
    "",
    "## Plots",
    "",
    *(f"![{name}]({name})" for name in plots),
    "",
    "Samples: `evaluation/samples.jsonl` (every held-out prompt with the three models' responses and gold scores);",
    "the PPO runs dump samples against SFT in `ppo*/samples/`.",
  ]


# ------------------------------------------------------------------------------------------ the comparison


COMPARE_COLUMNS = (
  "method",
  "preferred to SFT",
  "95% interval",
  "preferred to the SFT baseline",
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
        "preferred to the SFT baseline": (
          f"{pct(e[f'baseline_win_rate_{name}'])} [{pct(e[f'baseline_win_rate_{name}_interval'][0])}, "
          f"{pct(e[f'baseline_win_rate_{name}_interval'][1])}]"
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
      "preferred to the SFT baseline": "-",  # its samples are compare's own, the baseline's the evaluation's
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
    f"Held-out prompts: {c['prompts']}. Win rates: three held-out labelers against the response of the SFT model",
    "every method starts from (the PPO-init SFT), and against the SFT baseline's (Figure 1's reference; not",
    "measured for best-of-n) (95% intervals by resampling prompts). KL to SFT: Σ_t log π(y_t) − log π_SFT(y_t)",
    "of each model's own samples on those prompts, averaged (best-of-n: log n − (n − 1)/n). Δ pretraining loss:",
    "on held-out prose against the SFT model's. Wall time: the method's training stage on this machine.",
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


# ------------------------------------------------------------------------------------------ over seeds


# Differences of Figure 1's win rates that the seeds test (a, b): a's rate minus b's, the baseline's being 0.5.
DIFFERENCES = (
  ("PPO-ptx", "SFT baseline"),
  ("PPO", "SFT baseline"),
  ("PPO-ptx", "PPO"),
  ("PPO-ptx", "SFT"),
  ("SFT", "SFT baseline"),
  ("GPT prompted", "GPT"),
  ("SFT baseline", "GPT prompted"),
)


def _baseline_rate(e: dict, key: str) -> float:
  return 0.5 if key == "SFT baseline" else e[f"baseline_win_rate_{key}"]


def pooled_headline(runs: dict[int, dict]) -> dict[str, float]:
  """The mean over seeds of each seed's headline."""
  each = [headline(r) for r in runs.values()]
  return {k: float(sum(h[k] for h in each) / len(each)) for k in each[0]}


def _pooled_cell(values: list[float], fmt=_pct) -> str:
  """The mean over seeds and its 95% Student-t interval over seeds, as "mean [low, high]"."""
  from instructgpt_jax.sweep_table import pool

  p = pool(values)
  return f"{fmt(p.mean)} [{fmt(p.ci95[0])}, {fmt(p.ci95[1])}]"


def _seeds_figure1_rows(ev: list[dict]) -> tuple[list[str], list[str]]:
  """Figure 1 over seeds (each seed's evaluation in `ev`): report.md's rows and the summary's."""
  fig_rows, summary_rows = [], []
  for key, label in (*FIGURE1, PPO_INIT):
    rates = [_baseline_rate(e, key) for e in ev]
    if key == "SFT baseline":
      mean_cell, within = "50.0% (the baseline itself)", "-"
    else:
      mean_cell = _pooled_cell(rates)
      within = "; ".join(
        f"{_pct(e[f'baseline_win_rate_{key}_interval'][0])}-{_pct(e[f'baseline_win_rate_{key}_interval'][1])}"
        for e in ev
      )
    gold = _pooled_cell([e[f"gold_{key}"] for e in ev], lambda x: f"{x:.3f}")
    fig_rows.append(f"| {label} | {mean_cell} | {' / '.join(_pct(r) for r in rates)} | {within} | {gold} |")
    summary_rows.append(f"    {label:<34} {mean_cell}")
  return fig_rows, summary_rows


def _seeds_difference_rows(ev: list[dict]) -> list[str]:
  """The DIFFERENCES paired by seed, in points, and whether their interval over seeds excludes 0."""
  from instructgpt_jax.sweep_table import pool

  rows = []
  for a, b in DIFFERENCES:
    d = pool([_baseline_rate(e, a) - _baseline_rate(e, b) for e in ev])
    low, high = d.ci95
    verdict = "yes" if low > 0 or high < 0 else "no"
    rows.append(f"| {a} − {b} | {100 * d.mean:+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}] | {verdict} |")
  return rows


def write_seeds(workdir: str, runs: dict[int, dict], rl_stages: dict[str, str]) -> str:
  """report.md (and figure1.png) over seeds in `workdir`: each figure's mean over the seeds' runs with the 95%
  Student-t interval over seeds (sweep_table.pool), beside each run's own bootstrap interval; the paired
  differences that the seeds can or cannot tell from zero. Returns the summary for stdout."""
  seeds = sorted(runs)
  ev = [runs[s]["evaluation"] for s in seeds]
  fig_rows, summary_rows = _seeds_figure1_rows(ev)
  rm = _pooled_cell([runs[s]["rm"]["eval_accuracy"] for s in seeds])
  agreement = _pooled_cell([runs[s]["labels"]["agreement_held_out_labelers"] for s in seeds])
  tax = {
    n: _pooled_cell([_alignment_tax(runs[s])[n] for s in seeds], lambda x: f"{x:+.3f}") for n in ("ppo", "ppo_ptx")
  }
  lines = [
    f"# The InstructGPT lab over {len(seeds)} seeds",
    "",
    f"Seeds {', '.join(map(str, seeds))}: each ran the whole lab (its own tokenizer, models, labels, prompts and",
    "labelers' draws) in `seed_<seed>/`, which holds that run's own report. Each cell: the mean over seeds with",
    "the 95% Student-t interval over seeds (mean ± t₀.₉₇₅,ₙ₋₁ · s/√n).",
    "",
    "## Figure 1 in miniature: every model against the SFT baseline",
    "",
    "| model | preferred to the SFT baseline | each seed | each seed's 95% bootstrap interval | gold quality |",
    "|---|---|---|---|---|",
    *fig_rows,
    "",
    "## Which differences the seeds can tell from zero",
    "",
    "Paired by seed: a's win rate against the SFT baseline minus b's (the baseline's own is 50%), in points.",
    "",
    "| difference | mean | 95% interval over seeds | excludes 0 |",
    "|---|---|---|---|",
    *_seeds_difference_rows(ev),
    "",
    "## The reward model and the alignment tax",
    "",
    "| | over seeds |",
    "|---|---|",
    f"| RM accuracy on comparisons by held-out labelers | {rm} |",
    f"| agreement between two held-out labelers | {agreement} |",
    f"| pretraining loss change, PPO (γ = 0) | {tax['ppo']} |",
    f"| pretraining loss change, PPO-ptx (γ = 27.8) | {tax['ppo_ptx']} |",
    "",
  ]
  summary = [
    f"== the InstructGPT lab over {len(seeds)} seeds: mean [95% interval over seeds] ==",
    "  Figure 1: preferred to the SFT baseline",
    *summary_rows,
    f"  RM accuracy (held-out labelers)  {rm};  labeler agreement {agreement}",
    f"  pretraining loss change  PPO {tax['ppo']};  PPO-ptx {tax['ppo_ptx']}",
  ]
  if all("compare" in runs[s] for s in seeds):
    table = _pooled_comparison([runs[s] for s in seeds], _pooled_cell)
    lines += ["## The comparison of methods over seeds", "", table, ""]
    summary += ["== the lab's comparison over seeds ==", table]
  lines.append(f"![figure1.png]({_seeds_plot(workdir, runs)})")
  paths.write_text(paths.join(workdir, "report.md"), "\n".join(lines) + "\n")
  summary.append(f"  report: {paths.join(workdir, 'report.md')}")
  return "\n".join(summary)


def _pooled_comparison(runs: list[dict], cell) -> str:
  """The comparison table (COMPARE_COLUMNS but the wall time) with every cell pooled over seeds."""
  rows = []
  for name in runs[0]["compare"]["methods"]:
    trained = name != "SFT"
    methods = [r["compare"]["methods"][name] for r in runs]
    rows.append(
      {
        "method": name,
        "preferred to SFT": cell([r["evaluation"][f"win_rate_{name}"] for r in runs]) if trained else "-",
        "preferred to the SFT baseline": cell([r["evaluation"][f"baseline_win_rate_{name}"] for r in runs]),
        "gold quality": cell([r["evaluation"][f"gold_{name}"] for r in runs], lambda x: f"{x:.3f}"),
        "KL to SFT": cell([m["kl"] for m in methods], lambda x: f"{x:.2f}"),
        "Δ pretraining loss": cell([m["pretraining_loss_change"] for m in methods], lambda x: f"{x:+.3f}"),
      }
    )
  points = [next(p for p in r["compare"]["best_of_n"] if "win_rate" in p) for r in runs]
  rows.append(
    {
      "method": f"best-of-{points[0]['n']} (SFT + RM)",
      "preferred to SFT": cell([p["win_rate"] for p in points]),
      "preferred to the SFT baseline": "-",
      "gold quality": cell([p["gold"] for p in points], lambda x: f"{x:.3f}"),
      "KL to SFT": f"{points[0]['kl']:.2f}",
      "Δ pretraining loss": "+0.000",
    }
  )
  return metrics.markdown_table(tuple(rows[0]), rows)


def _seeds_plot(workdir: str, runs: dict[int, dict]) -> str:
  """Figure 1 over seeds: each seed's win rate (dots) and their mean with the 95% interval over seeds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from instructgpt_jax.sweep_table import pool

  fig, ax = plt.subplots(figsize=(6.5, 3.5))
  models = (*FIGURE1, PPO_INIT)
  for i, (key, _) in enumerate(models):
    rates = [_baseline_rate(runs[s]["evaluation"], key) for s in sorted(runs)]
    ax.plot([i] * len(rates), rates, ".", color="grey", alpha=0.6)
    p = pool(rates)
    err = [[p.mean - p.ci95[0]], [p.ci95[1] - p.mean]] if key != "SFT baseline" else None
    ax.errorbar([i], [p.mean], yerr=err, fmt="o", capsize=5, color="tab:blue")
  ax.set_xticks(range(len(models)), [label.replace(" (", "\n(") for _, label in models], fontsize=7)
  ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
  ax.set(ylim=(0, 1), ylabel="win rate against SFT", title=f"Figure 1 in miniature, {len(runs)} seeds")
  return _save(fig, workdir, "figure1.png")
