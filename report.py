"""What a run leaves in its log folder: the words (the summaries of one run and of many seeds,
the Analysis rules, the Target / Result / Analysis block, the header and tables), the PNGs, the
checks that a record read back holds every field its readers use, and the files themselves:
each written whole, a run's set committed at once, the folder locked while a run writes to it.
Nothing here trains, prints or handles a signal; `runner.py` decides when to write.
"""
import contextlib
import datetime
import errno
import fcntl
import io
import json
import math
import os
import platform
import shlex
import stat
import statistics
import sys
from pathlib import Path

import torch

from common import BAR, LAST_N, MAX_EPOCHS, MNIST_SIZES, PARAM_BUDGET, ROTATED_TEST_DEG, ROTATED_TEST_SEED, \
    UserError, holds_bar, percent

SEED_MARGIN = 99.50        # mean lowest-of-last-N over seeds at which a new seed rarely misses

# ----------------------------------------------------------------------------- tables

def format_table(header, rows, align):
    """A plain-text table; `align` holds one '<' or '>' per column."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [" ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths)).rstrip() for row in cells]


def format_layer_table(table):
    rows = [(r["layer"], "x".join(map(str, r["output"])), f"{r['params']:,}", r["rf"]) for r in table]
    rows.append(("total", "", f"{sum(r['params'] for r in table):,}", ""))
    return format_table(("layer", "output shape", "params", "RF"), rows, "<<>>")


def most_confused(matrix, k=5):
    off = matrix.clone()
    off.fill_diagonal_(0)
    values, flat = off.flatten().topk(k)
    return [(int(i) // 10, int(i) % 10, int(v)) for v, i in zip(values, flat) if v > 0]


def format_confusion(matrix):
    rows = [[r] + matrix[r].tolist() for r in range(10)]
    pairs = ", ".join(f"{t} as {p}: {n}" for t, p, n in most_confused(matrix))
    return (["confusion matrix of the final test pass (rows: true digit, columns: predicted)"]
            + format_table([""] + list(range(10)), rows, ">" * 11)
            + [f"most confused (true as predicted): {pairs or 'none'}"])


# ----------------------------------------------------------------------------- summaries

def summarize(history):
    """The Result numbers of one run, derived from its per-epoch counts. The bar is judged on the
    last LAST_N epochs within MAX_EPOCHS (`judged`: their numbers, 1-based)."""
    test = [percent(h["test_correct"], h["test_total"]) for h in history]
    train = [percent(h["train_correct"], h["train_total"]) for h in history]
    within = history[:MAX_EPOCHS]
    judged = within[-LAST_N:] if len(within) >= LAST_N else []
    last = test[-LAST_N:]
    return {"epochs": len(history),
            "best_train": max(train), "best_train_epoch": train.index(max(train)) + 1,
            "final_train": train[-1],
            "best_test": max(test), "best_test_epoch": test.index(max(test)) + 1,
            "final_test": test[-1], "last_tests": last,
            "last_min": min(last), "last_spread": max(last) - min(last),
            "judged": [h["epoch"] for h in judged],
            "judged_tests": [percent(h["test_correct"], h["test_total"]) for h in judged],
            "holds_bar": bool(judged) and all(holds_bar(h["test_correct"], h["test_total"]) for h in judged),
            "gap": train[-1] - test[-1],
            "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history)}


def wilson_lower(k, n, z=1.96):
    """Lower end of the 95% Wilson interval for a rate of k successes in n trials."""
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_summary(runs):
    """Across seeds: how many held the bar, the 95% lower bound on that rate, the worst and the
    mean +- std of the lowest-of-last-N, and mean +- std of the final accuracy."""
    summaries = [summarize(r["history"]) for r in runs]
    held = sum(s["holds_bar"] for s in summaries)
    lows, finals = [s["last_min"] for s in summaries], [s["final_test"] for s in summaries]
    return {"seeds": [r["seed"] for r in runs], "runs": len(runs), "held": held,
            "held_lower_95": wilson_lower(held, len(runs)), "worst_low": min(lows),
            "low": mean_std(lows), "final": mean_std(finals)}


def paired_difference(full_runs, variant_runs):
    """Mean and standard error of (variant - full) lowest-of-last-N over the seeds both ran."""
    full = {r["seed"]: summarize(r["history"])["last_min"] for r in full_runs}
    diffs = [summarize(r["history"])["last_min"] - full[r["seed"]] for r in variant_runs if r["seed"] in full]
    mean, std = mean_std(diffs)
    return mean, std / math.sqrt(len(diffs)), len(diffs)


# ----------------------------------------------------------------------------- the Analysis rules
# Each rule takes numbers and returns a list of sentences that are true of them.

OVERFIT_GAP = 0.5          # train above test by this many points at the end: overfitting
SLIGHT_OVERFIT_GAP = 0.15  # ...by this many: slight overfitting
UNDERFIT_TRAIN = 99.0      # train accuracy below this, unregularised: underfitting
SETTLED_SPREAD = 0.10      # last-N test spread up to this: settled
MOVING_SPREAD = 0.25       # ...up to this: still moving; above: noisy
ROBUSTNESS_STEP = 0.1      # rotated-copy change that counts as more or less robust
GAIN_IN_SE = 2.0           # an ablation difference is called real beyond this many standard errors


def fit_sentences(s, regularised):
    gap, train = s["gap"], s["final_train"]
    if gap >= OVERFIT_GAP:
        return [f"Overfitting: the final train accuracy ({train:.2f}) is {gap:.2f} points above "
                f"test ({s['final_test']:.2f}); the model memorises more than it generalises."]
    if gap >= SLIGHT_OVERFIT_GAP:
        return [f"Slight overfitting: train is {gap:.2f} points above test at the end."]
    if train < UNDERFIT_TRAIN and not regularised:
        return [f"Underfitting: train accuracy ends at only {train:.2f} and test is within "
                f"{abs(gap):.2f} of it; the model has not learnt the training set."]
    if gap < 0:
        return [f"No overfitting: test ends {-gap:.2f} points above train, whose accuracy is "
                f"measured on {'augmented or dropped-out' if regularised else 'changing'} batches "
                f"while the weights still move."]
    return [f"No overfitting: train and test end within {gap:.2f} points of each other."]


def bar_sentences(s, history):
    n = s["epochs"]
    if not s["judged"]:
        return [f"Bar not judged: it needs {LAST_N} epochs and this run trained {n} (final test "
                f"{s['final_test']:.2f})."]
    where = f"epochs {s['judged'][0]}-{s['judged'][-1]}"
    over = [f"This run trained {n} epochs; the bar counts within {MAX_EPOCHS}, so it is judged on "
            f"{where}."] if n > MAX_EPOCHS else []
    values = " / ".join(f"{a:.2f}" for a in s["judged_tests"])
    if s["holds_bar"]:
        return over + [f"Bar met: each of {where} is >= {BAR:.2f} ({values}), lowest "
                       f"{min(s['judged_tests']):.2f}."]
    first = next((h["epoch"] for h in history[:MAX_EPOCHS] if holds_bar(h["test_correct"], h["test_total"])), None)
    if first is None:
        best = max(s["judged_tests"] + [s["best_test"]] * (n <= MAX_EPOCHS))
        return over + [f"Bar missed: test accuracy never reaches {BAR:.2f} within {MAX_EPOCHS} "
                       f"epochs; best {best:.2f} is {BAR - best:.2f} short."]
    misses = sum(a < BAR for a in s["judged_tests"])  # display only; the verdict used counts
    return over + [f"Bar missed: {BAR:.2f} is first reached at epoch {first}, but {misses} of "
                   f"{where} fall below it ({values})."]


def stability_sentences(s):
    if s["epochs"] < 2:
        return ["Only one epoch: no spread between epochs to judge."]
    spread, n = s["last_spread"], len(s["last_tests"])
    word = "settled" if spread <= SETTLED_SPREAD else "still moving" if spread <= MOVING_SPREAD else "noisy"
    return [f"Over the last {n} epochs test accuracy spans {spread:.2f} points: {word}."]


def previous_sentences(s, params, prev):
    if prev is None:
        return ["No previous record to compare with."]
    p = summarize(prev["history"])
    return [f"Against step {prev['step']}: parameters {prev['params']:,} -> {params:,}; best test "
            f"{p['best_test']:.2f} -> {s['best_test']:.2f} ({s['best_test'] - p['best_test']:+.2f}); "
            f"final gap {p['gap']:.2f} -> {s['gap']:.2f}; seconds per epoch "
            f"{p['seconds_per_epoch']:.1f} -> {s['seconds_per_epoch']:.1f}."]


def rotated_sentences(step, rotated, prev_rotated):
    text = (f"On the rotated test copy (+-{ROTATED_TEST_DEG:g} deg, seed {ROTATED_TEST_SEED}) this "
            f"step scores {rotated:.2f}")
    if prev_rotated is None:
        return [text + "."]
    diff = rotated - prev_rotated
    verdict = "more robust to rotation than" if diff > ROBUSTNESS_STEP else "less robust to rotation than" \
        if diff < -ROBUSTNESS_STEP else "about as robust to rotation as"
    return [text + f" against {prev_rotated:.2f} for step {step - 1}'s weights ({diff:+.2f}): "
                   f"{verdict} the previous step."]


def seeds_sentences(seeds):
    if seeds is None:
        return []
    sm = seed_summary(seeds["runs"])
    held = "all" if sm["held"] == sm["runs"] else f"{sm['held']} of"
    return [f"Across {sm['runs']} seeds ({seed_list(sm['seeds'])}) {held} {sm['runs']} held the "
            f"bar in each of their last {LAST_N} epochs; the 95% lower confidence bound on the share "
            f"of seeds that hold is {100 * sm['held_lower_95']:.0f}% (Wilson). Lowest of last {LAST_N}: "
            f"worst {sm['worst_low']:.2f}, mean {sm['low'][0]:.2f} +- {sm['low'][1]:.2f}; final "
            f"accuracy {sm['final'][0]:.2f} +- {sm['final'][1]:.2f} (mean +- std over seeds)."]


def ablation_sentences(ablation):
    if ablation is None:
        return []
    full, *others = ablation["variants"]
    seeds = [r["seed"] for r in full["runs"]]
    low = seed_summary(full["runs"])["low"]
    out = [f"Ablation ({len(seeds)} seeds per variant: {seed_list(seeds)}): the full recipe's lowest "
           f"of last {LAST_N} is {low[0]:.2f} +- {low[1]:.2f} (mean +- std)."]
    for v in others:
        diff, se, n = paired_difference(full["runs"], v["runs"])
        if n < 2:
            judged = "one seed cannot tell a change from seed noise"
        elif abs(diff) <= GAIN_IN_SE * se:
            judged = f"within seed noise (|{diff:+.2f}| <= {GAIN_IN_SE:g} x SE {se:.2f})"
        elif diff < 0:
            judged = f"a real loss without it (beyond {GAIN_IN_SE:g} x SE {se:.2f}): this change earns its place"
        else:
            judged = f"the variant without it did better (beyond {GAIN_IN_SE:g} x SE {se:.2f})"
        out.append(f"Without {v['name']} ({v['reverted']}): lowest of last {LAST_N} "
                   f"{seed_summary(v['runs'])['low'][0]:.2f}, {diff:+.2f} against the full recipe; {judged}.")
    return out


def next_sentences(s, facts, seeds=None, ablation=None):
    if not s["judged"]:
        return [f"Next: train {MAX_EPOCHS} epochs, so the bar can be judged on the last {LAST_N}."]
    if s["holds_bar"] and not (seeds and ablation):
        todo = [what for what, done in (("that it holds across seeds (--seeds 1-20)", seeds),
                                        ("which change earned it (--ablate)", ablation)) if not done]
        return ["Next: the bar is met in this run; check " + " and ".join(todo) + "."]
    sm = seed_summary(seeds["runs"]) if seeds else None
    if sm and sm["held"] < sm["runs"]:
        return [f"Next: {sm['runs'] - sm['held']} of {sm['runs']} seeds missed the bar, so holding it is "
                "not yet a property of the recipe: the margin must grow before anything else."]
    if sm and sm["low"][0] < SEED_MARGIN:
        return [f"Next: all {sm['runs']} seeds held, but their mean lowest of last {LAST_N} "
                f"({sm['low'][0]:.3f}) is under {SEED_MARGIN:.2f}, so a seed not yet tried can still "
                "miss: the margin must grow before anything else."]
    if not s["holds_bar"] and facts["augmented"] and facts["scheduled"]:
        return ["Next: the bar is not held by this run, with augmentation and an LR schedule already "
                "in place; the margin must come from the recipe or the model, not from more epochs."]
    return ["Next: " + " ".join(facts["next"].split())]


def analyze(s, history, facts, prev=None, seeds=None, ablation=None):
    """The Analysis: every sentence is derived from the numbers passed in. `facts` holds what the
    model and recipe are (params, batchnorm, regularised, step, rotated accuracies, next text)."""
    params = facts["params"]
    budget = (f"{params:,} parameters: {'within' if params < PARAM_BUDGET else 'over'} the "
              f"{PARAM_BUDGET:,} budget ({100 * params / PARAM_BUDGET:.0f}% of it).")
    return ([budget] + fit_sentences(s, facts["regularised"]) + bar_sentences(s, history)
            + stability_sentences(s) + previous_sentences(s, params, prev)
            + rotated_sentences(facts["step"], facts["rotated"], facts["prev_rotated"])
            + seeds_sentences(seeds) + ablation_sentences(ablation)
            + next_sentences(s, facts, seeds, ablation))


def seed_list(seeds):
    """1, 2, 3, 5 -> '1-3, 5'"""
    parts, start = [], None
    for i, seed in enumerate(seeds):
        start = seed if start is None else start
        if i + 1 == len(seeds) or seeds[i + 1] != seed + 1:
            parts.append(str(seed) if seed == start else f"{start}-{seed}")
            start = None
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the block

def previous_line(step, prev, why):
    if step == 1:
        return "This is the first step: nothing measured yet."
    if prev is None:
        return f"{why} (run step{step - 1}.py first); the reasons below stand without its numbers."
    p = summarize(prev["history"])
    return (f"Step {step - 1} measured: {prev['params']:,} parameters, best train "
            f"{p['best_train']:.2f}, best test {p['best_test']:.2f}, final gap {p['gap']:.2f}, "
            f"last {len(p['last_tests'])} test {' / '.join(f'{a:.2f}' for a in p['last_tests'])}, "
            f"{p['seconds_per_epoch']:.1f} s per epoch.")


def result_lines(s, params, wall, rotated, prev_rotated):
    last = " / ".join(f"{a:.2f}" for a in s["last_tests"])
    prev = f" (previous step's weights: {prev_rotated:.2f})" if prev_rotated is not None else ""
    return [f"Parameters: {params:,}",
            f"Best train accuracy: {s['best_train']:.2f} (epoch {s['best_train_epoch']}); final {s['final_train']:.2f}",
            f"Best test accuracy: {s['best_test']:.2f} (epoch {s['best_test_epoch']}); final {s['final_test']:.2f}",
            f"Last {len(s['last_tests'])} test accuracies: {last}",
            f"Train-test gap (final epoch): {s['gap']:+.2f}",
            f"Seconds per epoch: {s['seconds_per_epoch']:.1f}; total wall time {wall:.0f} s",
            f"Rotated test copy accuracy: {rotated:.2f}{prev}"]


def format_block(target, result, analysis):
    out = ["", "=" * 78, "TARGET"]
    out += [f"  {line}" for line in target]
    out += ["RESULT"] + [f"  {i}. {line}" for i, line in enumerate(result, 1)]
    out += ["ANALYSIS"] + [f"  {i}. {line}" for i, line in enumerate(analysis, 1)]
    return out + ["=" * 78]


def epoch_line(h, epochs, label=""):
    return (f"{label}epoch {h['epoch']:2d}/{epochs} | train loss {h['train_loss']:.4f} acc "
            f"{percent(h['train_correct'], h['train_total']):6.2f} | test loss {h['test_loss']:.4f} acc "
            f"{percent(h['test_correct'], h['test_total']):6.2f} | lr {h['lr']:.4f} | {h['seconds']:5.1f} s")


# ----------------------------------------------------------------------------- pictures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def plot_curves(history, title):
    fig, (acc, loss) = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    epochs = [h["epoch"] for h in history]
    for split in ("train", "test"):
        acc.plot(epochs, [percent(h[f"{split}_correct"], h[f"{split}_total"]) for h in history], "o-", label=split)
        loss.plot(epochs, [h[f"{split}_loss"] for h in history], "o-", label=split)
    acc.axhline(BAR, color="grey", ls="--", lw=1, label=f"{BAR:.2f}")
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title=title, ylim=(max(90, acc.get_ylim()[0]), 100))
    loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    acc.legend(), loss.legend()
    return _png(fig)


def plot_misclassified(images, labels, predicted, limit=40):
    wrong = (predicted != labels).nonzero().flatten()[:limit].cpu()
    cols, rows = 10, max(1, math.ceil(len(wrong) / 10))
    fig, axes = _pyplot().subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i, 0].float().cpu(), cmap="gray_r")
        ax.set_title(f"{labels[i].item()} as {predicted[i].item()}", fontsize=8)
    return _png(fig)


def plot_steps(records):
    """Test accuracy per epoch of every step record given."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for r in records:
        ax.plot([h["epoch"] for h in r["history"]],
                [percent(h["test_correct"], h["test_total"]) for h in r["history"]], "o-",
                ms=3, label=f"step {r['step']} ({r['params']:,} params)")
    ax.axhline(BAR, color="grey", ls="--", lw=1, label=f"{BAR:.2f} bar")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(97.5, 100),
           title="MNIST drill-down: test accuracy per epoch")
    ax.legend(loc="lower right")
    return _png(fig)


def plot_seeds(runs, title):
    """Every seed's test accuracy per epoch, a thin line each; the judged epochs marked."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for r in runs:
        s = summarize(r["history"])
        tests = [percent(h["test_correct"], h["test_total"]) for h in r["history"]]
        ax.plot([h["epoch"] for h in r["history"]], tests, lw=0.8, alpha=0.7,
                color="tab:blue" if s["holds_bar"] else "tab:red")
        ax.plot(s["judged"], s["judged_tests"], "o", ms=2.5, color="tab:blue" if s["holds_bar"] else "tab:red")
    ax.axhline(BAR, color="grey", ls="--", lw=1)
    held = sum(summarize(r["history"])["holds_bar"] for r in runs)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(98.8, 99.8),
           title=f"{title}: {held} of {len(runs)} hold {BAR:.2f} (dashed) in the marked epochs")
    return _png(fig)


# ----------------------------------------------------------------------------- the log's header

def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device):
    """What computed a record's numbers: the GPU's name on CUDA, else the CPU's. The same seed
    differs between machine kinds, so only runs of one kind are compared count for count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def header_lines(run, mode, threads):
    """The log's first lines: when, what was run, where, with what, and the data as measured."""
    import torchvision
    args, data = run.args, run.data
    stats = data.stats
    return [f"step {run.step.number} ({mode}) - {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}",
            f"{f'seeds {seed_list(args.seeds)}' if args.seeds else f'seed {args.seed}'}, device {run.device}, "
            f"{threads} CPU threads a run, --jobs {args.jobs}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}",
            f"recipe: {run.recipe.describe()}, {run.recipe.epochs} epochs",
            f"machine: {cpu_name()}, {os.cpu_count()} cores",
            f"data: {Path(args.data_dir or 'data').resolve()}",
            f"  train {stats['shape']} {stats['dtype']}, test {list(data.test_images.shape)}; pixel mean "
            f"{stats['mean']:.4f} std {stats['std']:.4f} (used to normalise), min {stats['min']:.1f} max {stats['max']:.1f}",
            f"  train class counts 0-9: {stats['class_counts']}"]


def input_warnings(run):
    """Lines for inputs that run but deserve a word: more epochs than allowed, a non-MNIST split."""
    out = []
    if run.recipe.epochs > MAX_EPOCHS:
        out.append(f"warning: --epochs {run.recipe.epochs} is more than the assignment's {MAX_EPOCHS}; "
                   f"the bar is judged on epochs {MAX_EPOCHS - LAST_N + 1}-{MAX_EPOCHS}")
    sizes = (len(run.data.train_labels), len(run.data.test_labels))
    if sizes != MNIST_SIZES:
        out.append(f"warning: {sizes[0]:,} train and {sizes[1]:,} test images, not MNIST's "
                   f"{MNIST_SIZES[0]:,} and {MNIST_SIZES[1]:,}: numbers are not comparable with MNIST's")
    return out


# ----------------------------------------------------------------------------- record checks
# A record read back from disk is used only if its check passes: each check touches every field
# that any reader above uses, so a record that passes cannot fail later in a reader.

HISTORY_FIELDS = {"epoch": int, "train_loss": float, "train_correct": int, "train_total": int,
                  "test_loss": float, "test_correct": int, "test_total": int, "lr": float, "seconds": float}


def _need(ok, what):
    if not ok:
        raise ValueError(what)


def _is(value, kind):
    """JSON's types: an int is a number too, but a bool is neither."""
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind)


def check_counts(counts, what):
    _need(isinstance(counts, dict) and _is(counts.get("correct"), int) and _is(counts.get("total"), int)
          and 0 <= counts["correct"] <= counts["total"] and counts["total"] > 0, f"{what} is not a count")


def check_history(history):
    _need(isinstance(history, list) and history, "history is not a list of epochs")
    for i, h in enumerate(history, 1):
        _need(isinstance(h, dict), f"history entry {i} is not a dict")
        for key, kind in HISTORY_FIELDS.items():
            _need(_is(h.get(key), kind), f"history entry {i} has no {kind.__name__} {key!r}")
        for split in ("train", "test"):
            check_counts({"correct": h[f"{split}_correct"], "total": h[f"{split}_total"]}, f"{split} of entry {i}")


def check_single(record):
    """Raise ValueError unless a step's record holds what its readers use."""
    _need(isinstance(record, dict), "the record is not a dict")
    for key in ("params", "step"):
        _need(_is(record.get(key), int), f"{key} is not an integer")
    check_history(record.get("history"))
    check_counts(record.get("rotated_test"), "rotated_test")


def check_runs(runs):
    _need(isinstance(runs, list) and runs, "runs is not a list of runs")
    for r in runs:
        _need(isinstance(r, dict) and _is(r.get("seed"), int), "a run has no integer seed")
        check_history(r.get("history"))
        check_counts(r.get("rotated_test"), f"rotated_test of seed {r['seed']}")


def check_seeds(record):
    """Raise ValueError unless a --seeds record holds what its readers use."""
    _need(isinstance(record, dict) and _is(record.get("params"), int), "params is not an integer")
    check_runs(record.get("runs"))


def check_partial(record):
    """Raise ValueError unless an interrupted sweep's runs can be taken up again."""
    check_seeds(record)
    for r in record["runs"]:
        _need(isinstance(r.get("recipe"), dict) and (r.get("variant") is None or _is(r.get("variant"), str)),
              f"seed {r['seed']} has no recipe or variant")


def check_ablation(record):
    """Raise ValueError unless an --ablate record holds what its readers use."""
    _need(isinstance(record, dict) and _is(record.get("params"), int), "params is not an integer")
    variants = record.get("variants")
    _need(isinstance(variants, list) and variants, "variants is not a list")
    for v in variants:
        _need(isinstance(v, dict) and _is(v.get("name"), str) and _is(v.get("reverted"), str),
              "a variant has no name or reverted text")
        check_runs(v.get("runs"))


# ----------------------------------------------------------------------------- sweep tables

def seeds_table(runs):
    rows = []
    for r in runs:
        s = summarize(r["history"])
        rows.append((r["seed"], " / ".join(f"{a:.2f}" for a in s["last_tests"]), f"{s['last_min']:.2f}",
                     f"{s['final_test']:.2f}", f"{s['best_test']:.2f}", "yes" if s["holds_bar"] else "NO"))
    return format_table(("seed", f"last {LAST_N} test", "lowest", "final", "best", "held"), rows, ">>>>>>")


def ablation_table(variants):
    rows = []
    for v in variants:
        sm = seed_summary(v["runs"])
        rotated = statistics.mean(percent(r["rotated_test"]["correct"], r["rotated_test"]["total"]) for r in v["runs"])
        rows.append((v["name"], f"{sm['final'][0]:.2f}", f"{sm['low'][0]:.2f} +- {sm['low'][1]:.2f}",
                     f"{sm['worst_low']:.2f}", f"{sm['held']}/{sm['runs']}", f"{rotated:.2f}", v["reverted"]))
    return format_table(("variant", "final", f"lowest of last {LAST_N}", "worst", "held", "rotated", "reverted"),
                        rows, "<>>>>><")


# ----------------------------------------------------------------------------- files

LOCK_NAME = ".lock"        # in the log folder: held by the one run that writes there


def encoded(data):
    """Bytes to write: text as UTF-8, with any character that has no UTF-8 form (a file name
    that is not UTF-8 reaches Python as a lone surrogate) written as a backslash escape."""
    return data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data


def write_hidden(path, data, kind):
    """Write `data` to a hidden file beside `path` and return its name; nothing is left on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{kind}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(encoded(data))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_file(path, data):
    """Replace `path` whole: a crash leaves the old file or the new one, never half of one."""
    os.replace(write_hidden(Path(path), data, "new"), path)


def read_regular(path):
    """The bytes of `path`, refusing (OSError) anything but a regular file: a FIFO would block."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read()


def usable_record(path, check, missing_ok=False):
    """(record, None), or (None, why) when it is missing, unreadable or fails `check`; with
    missing_ok, a missing record is (None, None): nothing to say about a file never made."""
    try:
        record = json.loads(read_regular(path))
    except FileNotFoundError:
        return None, None if missing_ok else f"The record {path} was not found"
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep for json
        return None, f"The record {path} could not be read ({type(e).__name__})"
    try:
        check(record)
    except ValueError as e:
        return None, f"The record {path} could not be understood ({e}); treated as missing"
    return record, None


def commit(staged):
    """Rename every staged file ({final path: temporary path}) into place and return the old
    files' backups, for the caller to remove. A failed rename puts the old files back, so the old
    set stays whole or the new set is complete. Call it with signals held (runner.signals_held)."""
    for final in staged:
        if final.is_dir():
            raise UserError(f"{final} is a folder, where this run writes a file; move it away and run again")
    moved = []  # (final path, its old file's backup or None)
    try:
        for final, tmp in staged.items():
            backup = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
            try:
                os.replace(final, backup)
            except FileNotFoundError:
                backup = None
            moved.append((final, backup))
            os.replace(tmp, final)
    except BaseException:
        for final, backup in reversed(moved):
            os.replace(backup, final) if backup else final.unlink(missing_ok=True)
        raise
    return [backup for _, backup in moved if backup]


def lock_log_dir(path):
    """Take the log folder's lock and return its file descriptor, so that no two runs write one
    set; a second run is refused at once, naming the first (waiting would look like a hang)."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 1000).decode("utf-8", "replace").strip() or "another run"
        os.close(fd)
        raise UserError(f"{holder} is writing to {path}; wait for it to end, or pass another --log-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, encoded(f"run {os.getpid()} (python {shlex.join(sys.argv)})"))
    return fd  # closing it (or the end of the process, however it ends) releases the lock


def clean_stale(path):
    """Under the lock, every hidden .tmp file is a killed run's: a backup whose file is missing
    goes back in place (a kill between two renames of a commit); the rest are removed."""
    for tmp in path.glob(".*.tmp"):
        final = path / tmp.name[1:].rsplit(".", 3)[0]
        with contextlib.suppress(OSError):
            if tmp.name.endswith(".old.tmp") and not final.exists():
                os.replace(tmp, final)
            else:
                tmp.unlink()


def state_bytes(model):
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()
