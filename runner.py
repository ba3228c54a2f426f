"""What runs a step from the command line: the flags, the run modes (one run, --seeds,
--ablate, --eval), the worker processes of a sweep, the log folder (its lock, the files written
as one set, the partial files kept after a failure) and the signals. Every way out of `main` is
one line and an exit status, never a traceback.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple


def _quit_during_imports(signum, frame):
    """Ctrl-C while torch imports (seconds) quits at once with one line: raising
    KeyboardInterrupt there is not safe, torch catches a failed numpy import and goes on."""
    os.write(2, b"\ninterrupted before the run started; nothing was written.\n")
    os._exit(128 + signum)


_handler_before_imports = signal.signal(signal.SIGINT, _quit_during_imports)  # until the end of this file

import torch  # noqa: E402 - after the handler, which must cover the torch import

from common import MAX_EPOCHS, Diverged, Recipe, UserError, confusion_matrix, count_params, evaluate, \
    layer_table, load_data, make_net, percent, predict, recorded_recipe, resolve_precision, rotated_copy, \
    train, train_job  # noqa: E402
from report import ablation_sentences, ablation_table, analyze, check_ablation, check_partial, check_seeds, \
    check_single, \
    clean_stale, commit, epoch_line, format_block, format_confusion, format_layer_table, header_lines, \
    input_warnings, lock_log_dir, machine_name, plot_curves, plot_misclassified, plot_seeds, plot_steps, \
    previous_line, read_regular, result_lines, seed_list, seeds_sentences, seeds_table, state_bytes, summarize, \
    usable_record, write_file, write_hidden  # noqa: E402

MAX_SEED = 2**64 - 1       # torch.manual_seed takes 0 .. 2**64 - 1
MAX_LR = torch.finfo(torch.float32).max  # the optimizer holds the LR as a float32
TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

# ----------------------------------------------------------------------------- signals

@contextlib.contextmanager
def signals_held():
    """Terminating signals that arrive inside are acted on when it ends. (A signal mask would not
    do: torch's threads leave the signal free to land on another thread.)"""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in TERMINATING}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


# ----------------------------------------------------------------------------- a run

class Step(NamedTuple):
    """One step's story, as its file declares it."""
    number: int
    Net: type
    recipe: Recipe
    target: str                 # why this step, and what it aims at
    next: str                   # the Analysis' last sentence: what the next step does
    changes: dict = {}          # for --ablate: change -> {recipe field: the previous step's value}


@dataclasses.dataclass
class Run:
    """What every mode of a run shares: its step, flags and device, the data once loaded, the
    log so far, the files staged for the final commit, and the weights once trained."""
    step: Step
    args: argparse.Namespace
    recipe: Recipe
    device: torch.device
    name: str                               # file prefix: step4, step4_seeds, step4_ablation
    log_dir: Path | None = None
    data: object = None                     # common.Data, once loaded
    lines: list = dataclasses.field(default_factory=list)
    staged: dict = dataclasses.field(default_factory=dict)
    weights: bytes | None = None
    committed: bool = False
    lock: int | None = None                 # the log folder's lock, held from before the header
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def say(self, line="", always=False):
        """Log a line, and print it unless --quiet (`always`: print it anyway)."""
        self.lines.append(line)
        if always or not self.args.quiet:
            try:
                print(line, flush=True)
            except OSError:  # the terminal or pipe went away: the log still gets every line
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def stage(self, filename, data):
        """Write one output file of the run under a temporary name until commit."""
        final = self.log_dir / filename
        self.staged[final] = write_hidden(final, data, "staged")

    def commit(self):
        """Put every staged file in place at once and drop an earlier run's partial files; a
        signal that arrives meanwhile is acted on after, when the new set is complete."""
        with signals_held():
            backups = commit(self.staged)
            self.committed, self.staged = True, {}
            for old in backups + [self.log_dir / f"{self.name}.partial{s}" for s in (".log", ".pt", ".json")]:
                with contextlib.suppress(OSError):  # what is left, the next run's clean_stale removes
                    old.unlink(missing_ok=True)

    def keep_partial(self, why, details=()):
        """After a failure: drop staged files, keep trained weights and the log so far under
        partial names (the weights first: they cost the most), and say truly what is where."""
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        if self.log_dir is None or not self.lines:
            return "Nothing was written."
        prefix = self.log_dir / self.name
        said = [f"The new {prefix}.* set was complete before that" if self.committed else
                f"The previous {prefix}.* files are untouched"]
        weights = Path(f"{prefix}.partial.pt")
        try:
            if self.weights is None or self.committed:
                weights.unlink(missing_ok=True)  # an older run's: it does not belong to this log
            else:
                write_file(weights, self.weights)
                said.append(f"its trained weights are in {weights}")
        except OSError as e:
            said.append(f"its trained weights could not be saved ({e.strerror})")
        try:
            write_file(f"{prefix}.partial.log", "\n".join(self.lines + [f"[run stopped: {why}]", *details]) + "\n")
            said.append(f"this run so far is in {prefix}.partial.log")
        except OSError as e:
            said.append(f"the partial log could not be written ({e.strerror})")
        if Path(f"{prefix}.partial.json").exists():
            said.append(f"its finished runs are in {prefix}.partial.json, which the same command resumes from")
        return "; ".join(said) + "."

    def companion(self, mode, check):
        """This step's seeds or ablation record, if it was made with this very recipe and model."""
        record, why = usable_record(self.log_dir / f"step{self.step.number}_{mode}.json", check, missing_ok=True)
        if why:
            self.say(f"note: {why}.")
        params = count_params(make_net(self.step.Net, self.recipe))
        if record and recorded_recipe(record.get("recipe")) == self.recipe and record["params"] == params:
            return record
        return None


# ----------------------------------------------------------------------------- training jobs

_WORKER = {}  # a worker process's data, loaded at its first job


def _deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # tiny activations early in training cost 10x on CPU


def _exit_with_parent(parent):
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)  # the parent was killed: nobody will read this worker's results


def _worker_start(data_dir, device, threads):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends the pool
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    _deterministic()
    _WORKER.update(data_dir=data_dir, device=torch.device(device))


def _worker_job(job):
    # loaded in the job, not the initializer: a UserError then reaches the parent as itself
    if "data" not in _WORKER:
        _WORKER["data"] = load_data(_WORKER["data_dir"], _WORKER["device"])
    return train_job(*job, _WORKER["data"])


def job_threads(jobs):
    """CPU threads each of `jobs` worker processes gets: this process's, split between them."""
    return torch.get_num_threads() if jobs == 1 else max(1, torch.get_num_threads() // jobs)


def train_jobs(run, jobs):
    """Yield each (variant, recipe, seed) job's result as it finishes: here with --jobs 1, else in
    --jobs worker processes that split this process's CPU threads between them."""
    if run.args.jobs == 1:
        for variant, recipe, seed in jobs:
            yield train_job(variant, run.step.Net, recipe, seed, run.data)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch (or CUDA) has started
    start_args = (run.args.data_dir or "data", str(run.device), job_threads(run.args.jobs))
    with ProcessPoolExecutor(run.args.jobs, context, _worker_start, start_args) as pool:
        futures = [pool.submit(_worker_job, (v, run.step.Net, r, s)) for v, r, s in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()  # a worker that dies makes this raise BrokenProcessPool
        except BaseException:
            running = list(pool._processes.values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in running:  # end the running jobs now, not when they finish
                process.terminate()
            raise


def runs_text(n):
    """'1 run', '3 runs': a count for the notes (run_seeds and run_ablation keep lists named runs)."""
    return f"{n} run" + "s" * (n != 1)


def sweep_jobs(run, jobs):
    """train_jobs for a sweep that survives a kill: each result goes at once into
    stepN_<mode>.partial.json, and a later sweep with the same model, device, machine and threads
    takes the runs it finds there (same variant, recipe and seed) instead of training them again."""
    path = run.log_dir / f"{run.name}.partial.json"
    how = sweep_record(run, None)  # what makes a run's numbers the same: the model, where and how it ran
    here = {k: how[k] for k in ("params", "device", "machine", "threads", "torch")}
    here["model"] = hashlib.sha256(repr(make_net(run.step.Net, run.recipe)).encode()).hexdigest()
    saved, why = usable_record(path, check_partial, missing_ok=True)
    if why:
        run.say(f"note: {why}; this sweep's runs replace it.")
    differ = [k for k in here if saved and saved.get(k) != here[k]]
    if differ:
        run.say(f"note: {path} holds runs made with another {', '.join(differ)}; this sweep's runs replace them.")
    saved_runs = saved["runs"] if saved and not differ else []
    recipes = {(v, s): r for v, r, s in jobs}  # (variant, seed) is one job of a sweep

    def same_job(saved_run):
        recipe = recipes.get((saved_run["variant"], saved_run["seed"]))
        return recipe is not None and recorded_recipe(saved_run["recipe"]) == recipe
    done = [r for r in saved_runs if same_job(r)]
    if len(done) < len(saved_runs):
        run.say(f"note: {path} holds {runs_text(len(saved_runs) - len(done))} of other seeds or recipes than this "
                f"sweep's; this sweep's runs replace them.")
    if done:
        run.say(f"note: {len(done)} of {runs_text(len(jobs))} taken from {path}, left by an interrupted sweep "
                f"with the same model, recipes, device, machine and threads", always=True)
    for result in done:
        yield {k: v for k, v in result.items() if k != "recipe"}
    taken = {(r["variant"], r["seed"]) for r in done}
    failed_to_save = False
    for result in train_jobs(run, [(v, r, s) for v, r, s in jobs if (v, s) not in taken]):
        done.append({**result, "recipe": dataclasses.asdict(recipes[(result["variant"], result["seed"])])})
        try:
            write_file(path, json.dumps({**here, "runs": done}))
        except OSError as e:
            if not failed_to_save:
                run.say(f"note: {path} could not be written ({e.strerror}); an interrupted sweep will start over")
            failed_to_save = True
        yield result


# ----------------------------------------------------------------------------- run modes

def run_single(run):
    """Train once; write the log, record, weights and pictures as one set."""
    layers = layer_table(make_net(run.step.Net, run.recipe))
    for line in [""] + format_layer_table(layers) + [""]:
        run.say(line)
    history = []
    progress = not run.args.quiet and sys.stdout.isatty()
    for model, entry in train(run.step.Net, run.recipe, run.data, run.args.seed, progress):
        history.append(entry)
        run.say(epoch_line(entry, run.recipe.epochs))
    run.weights = state_bytes(model)  # from here on a failure keeps them as stepN.partial.pt
    predicted = predict(model, run.data.test_images, run.data.norm).argmax(1)
    record = single_record(run, history, layers, predicted, model)
    run.stage(f"{run.name}.pt", run.weights)
    run.stage(f"{run.name}.json", json.dumps(record, indent=1))
    run.stage(f"{run.name}.log", "\n".join(run.lines) + "\n")
    run.stage(f"{run.name}_curves.png", plot_curves(history, f"step {run.step.number}"))
    run.stage(f"{run.name}_misclassified.png", plot_misclassified(run.data.test_images, run.data.test_labels, predicted))
    others = [usable_record(run.log_dir / f"step{n}.json", check_single)[0] for n in range(1, 5)
              if n != run.step.number]
    run.stage("steps_test_accuracy.png", plot_steps(sorted([r for r in others if r] + [record], key=lambda r: r["step"])))
    run.commit()


def single_record(run, history, layers, predicted, model):
    """Confusion, rotated copy, the previous step, the Target / Result / Analysis block: the
    record of a finished single run (its lines go to the log as they are made)."""
    data, step = run.data, run.step
    matrix = confusion_matrix(predicted, data.test_labels)
    for line in [""] + format_confusion(matrix):
        run.say(line)
    total = len(data.test_labels)
    rotated = evaluate(model, rotated_copy(data.test_images), data.test_labels, data.norm)[1]
    prev, why = (None, None) if step.number == 1 else \
        usable_record(run.log_dir / f"step{step.number - 1}.json", check_single)
    sha = hashlib.sha256(run.weights).hexdigest()
    run.say(f"weights: {run.log_dir / run.name}.pt sha256 {sha}")
    block = make_block(run, history, layers, prev, why, percent(rotated, total))
    for line in format_block(**block):
        run.say(line, always=True)
    return {"step": step.number, "mode": "single", "seed": run.args.seed, "device": str(run.device),
            "command": sys.argv, "torch": torch.__version__, "recipe": dataclasses.asdict(run.recipe),
            "params": sum(r["params"] for r in layers), "data": data.stats, "layers": layers,
            "history": history, "wall_seconds": round(time.perf_counter() - run.started, 1),
            "rotated_test": {"correct": rotated, "total": total}, "confusion_matrix": matrix.tolist(),
            "weights_sha256": sha, "block": block}


def make_block(run, history, layers, prev, why, rotated):
    s, params = summarize(history), sum(r["params"] for r in layers)
    prev_rotated = percent(prev["rotated_test"]["correct"], prev["rotated_test"]["total"]) if prev else None
    recipe = run.recipe
    augmented = recipe.augmented
    facts = {"step": run.step.number, "params": params, "next": run.step.next, "augmented": augmented,
             "scheduled": recipe.schedule != "constant", "regularised": augmented or bool(recipe.dropout),
             "rotated": rotated, "prev_rotated": prev_rotated}
    analysis = analyze(s, history, facts, prev, run.companion("seeds", check_seeds),
                       run.companion("ablation", check_ablation))
    wall = time.perf_counter() - run.started
    return {"target": [previous_line(run.step.number, prev, why)] + run.step.target.strip().splitlines(),
            "result": result_lines(s, params, wall, rotated, prev_rotated), "analysis": analysis}


def say_job(run, result, done, total):
    """A finished job's epochs, under a line that says how far the sweep is."""
    name = f"{result['variant']}, " if result["variant"] else ""
    run.say(f"--- {name}seed {result['seed']}: {done} of {total} done", always=True)
    for h in result["history"]:
        run.say(epoch_line(h, len(result["history"])))


def sweep_record(run, mode, **fields):
    """What a --seeds or --ablate record says of how it ran, then its own fields."""
    return {"step": run.step.number, "mode": mode, "device": str(run.device), "command": sys.argv,
            "torch": torch.__version__, "recipe": dataclasses.asdict(run.recipe),
            "params": count_params(make_net(run.step.Net, run.recipe)), "jobs": run.args.jobs,
            "threads": job_threads(run.args.jobs), "machine": machine_name(run.device), **fields}


def commit_sweep(run, record, lines, pictures=()):
    """Say the sweep's summary lines, then write its record, log and pictures as one set."""
    run.say("")
    for line in lines:
        run.say(line, always=True)
    record["wall_seconds"] = round(time.perf_counter() - run.started, 1)
    run.say(f"{record['params']:,} parameters; {record['wall_seconds']:.0f} s with --jobs {run.args.jobs}", always=True)
    run.stage(f"{run.name}.json", json.dumps(record, indent=1))
    run.stage(f"{run.name}.log", "\n".join(run.lines) + "\n")
    for filename, png in pictures:
        run.stage(filename, png)
    run.commit()


def run_seeds(run):
    """One full run per seed; a table, the seed statistics and a picture, written as one set."""
    seeds = run.args.seeds
    runs = []
    for result in sweep_jobs(run, [(None, run.recipe, seed) for seed in seeds]):
        runs.append({k: v for k, v in result.items() if k != "variant"})
        say_job(run, result, len(runs), len(seeds))
    runs.sort(key=lambda r: seeds.index(r["seed"]))
    record = sweep_record(run, "seeds", runs=runs)
    title = f"step {run.step.number}, {len(runs)} seeds, {record['params']:,} parameters"
    commit_sweep(run, record, seeds_table(runs) + seeds_sentences(record),
                 [(f"{run.name}.png", plot_seeds(runs, title))])


def ablation_variants(recipe, changes):
    """[(name, reverted text, recipe)]: the full recipe, then one variant per declared change
    with exactly that change's fields set back to the previous step's values."""
    variants = [("full recipe", "nothing", recipe)]
    for name, previous in changes.items():
        text = ", ".join(f"{f} {getattr(recipe, f)} -> {v}" for f, v in previous.items())
        variants.append((name, text, dataclasses.replace(recipe, **previous)))
    return variants


def reused_runs(run, seeds):
    """The full recipe's runs of these seeds from this step's seeds record, when it was made with
    the same recipe, model, device, machine kind and threads a job: the same computation, so not
    repeated. A record that does not name its machine is not reused."""
    record = run.companion("seeds", check_seeds)
    here = (str(run.device), machine_name(run.device), job_threads(run.args.jobs))
    if not record or (record.get("device"), record.get("machine"), record.get("threads")) != here:
        return []
    known = {r["seed"]: r for r in record["runs"]}
    reused = [known[s] for s in seeds if s in known]
    if reused:
        run.say(f"full recipe: seeds {seed_list([r['seed'] for r in reused])} taken from "
                f"{run.log_dir / f'step{run.step.number}_seeds.json'} (same recipe, model, device, machine and threads)")
    return reused


def run_ablation(run):
    """The recipe and one variant per declared change, each over the same seeds."""
    seeds = run.args.seeds or [1, 2, 3]
    variants = ablation_variants(run.recipe, run.step.changes)
    for name, reverted, recipe in variants:
        run.say(f"{name}: reverted {reverted}; {recipe.describe()}")
    runs = {name: [] for name, _, _ in variants}
    runs["full recipe"] = reused_runs(run, seeds)
    done_seeds = {r["seed"] for r in runs["full recipe"]}
    jobs = [(name, recipe, seed) for name, _, recipe in variants for seed in seeds
            if not (name == "full recipe" and seed in done_seeds)]
    for done, result in enumerate(sweep_jobs(run, jobs), 1):
        runs[result["variant"]].append({k: v for k, v in result.items() if k != "variant"})
        say_job(run, result, done, len(jobs))
    record = sweep_record(run, "ablation", seeds=seeds, reused=sorted(done_seeds), variants=[
        {"name": n, "reverted": t, "recipe": dataclasses.asdict(r),
         "runs": sorted(runs[n], key=lambda x: seeds.index(x["seed"]))} for n, t, r in variants])
    commit_sweep(run, record, ablation_table(record["variants"]) + ablation_sentences(record))


def load_weights(run, path):
    """The step's Net with the weights in `path`, or a UserError that says what to pass."""
    n = run.step.number
    model = make_net(run.step.Net, run.recipe).to(run.device)
    try:
        blob = read_regular(path)
    except OSError as e:
        why = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
        raise UserError(f"{path} {why}; pass a weights file such as logs/step{n}.pt") from None
    try:
        state = torch.load(io.BytesIO(blob), map_location=run.device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}); re-run "
                        f"step{n}.py to write it again") from None
    try:
        model.load_state_dict(state)
    except Exception:
        raise UserError(f"{path} does not hold weights for step {n}'s Net (names or shapes differ); "
                        f"pass the stepN.pt written by step{n}.py") from None
    return model


def run_eval(run):
    """Test saved weights, and compare the count with the record beside them."""
    path = Path(run.args.eval)
    model = load_weights(run, path)
    data = run.data = load_data(run.args.data_dir or "data", run.device, download=run.args.data_dir is None)
    loss, correct = evaluate(model, data.test_images, data.test_labels, data.norm)
    predicted = predict(model, data.test_images, data.norm).argmax(1)
    for line in format_confusion(confusion_matrix(predicted, data.test_labels)):
        print(line)
    total = len(data.test_labels)
    record, _ = usable_record(path.with_suffix(".json"), check_single)
    known = ""
    if record:
        h = record["history"][-1]
        verdict = "matches" if (h["test_correct"], h["test_total"]) == (correct, total) else "differs"
        known = (f"; its record {path.with_suffix('.json')} says {h['test_correct']:,} of "
                 f"{h['test_total']:,} ({verdict})")
    print(f"{path}: test accuracy {percent(correct, total):.2f} ({correct:,} of {total:,}), loss "
          f"{loss:.4f}, {count_params(model):,} parameters{known}")


# ----------------------------------------------------------------------------- command line

def seed_value(text):
    """A seed: a whole number that torch's generator takes (0 .. 2**64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 .. {MAX_SEED} (what torch's generator takes)")
    return value


def seed_range(text):
    """'7' -> [7]; '1-20' -> [1, ..., 20]."""
    first, dash, last = text.partition("-")
    if not dash:
        return [seed_value(text)]
    low, high = seed_value(first), seed_value(last)
    if high < low:
        raise argparse.ArgumentTypeError(f"{text}: the range must go up (e.g. 1-20)")
    if high - low >= 10_000:
        raise argparse.ArgumentTypeError(f"{text}: more than 10,000 seeds")
    return list(range(low, high + 1))


def _positive(kind, most=float("inf")):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= most:
            limit = "finite" if most == float("inf") else f"at most {most:.3g}"
            raise argparse.ArgumentTypeError(f"must be a number > 0 and {limit}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_empty(what):
    def path(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty; name {what}")
        return text
    return path


def build_parser(step):
    recipe = step.recipe
    parser = argparse.ArgumentParser(
        prog=f"step{step.number}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"Step {step.number} of the MNIST drill-down: train {recipe.epochs} epochs, write "
                    f"logs/step{step.number}.log, .json and .pt, ending in a Target / Result / Analysis block.")
    add = parser.add_argument
    add("--epochs", type=_positive(int), default=recipe.epochs, help=f"epochs to train (the bar counts within {MAX_EPOCHS})")
    add("--data-dir", default=os.environ.get("MNIST_DIR"), help="folder holding MNIST/raw (also: MNIST_DIR); unset: download into ./data")
    add("--log-dir", type=_non_empty("a folder"), default="logs", help="where the log, record, weights and pictures go")
    add("--seed", type=seed_value, default=1, help="seeds weights, shuffling and augmentation")
    add("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    add("--lr", type=_positive(float, MAX_LR), default=recipe.lr, help="learning rate (the peak for a one-cycle schedule)")
    add("--batch-size", type=_positive(int), default=recipe.batch_size, help="training batch size")
    add("--precision", choices=("auto", "bf16", "fp32"), default=recipe.precision,
        help="training arithmetic: fp32, bf16 autocast, or auto (fp32: see resolve_precision); testing is always fp32")
    add("--quiet", action="store_true", help="no progress bars and no per-epoch lines on the terminal; the log is the same")
    add("--eval", metavar="WEIGHTS", type=_non_empty("a weights file"), help="test saved weights (e.g. logs/stepN.pt) and exit")
    add("--seeds", type=seed_range, nargs="+", metavar="SEED",
        help="one full run per seed (e.g. 1-20 or 1 5 9); writes stepN_seeds.log/.json/.png; with --ablate, its seeds")
    add("--ablate", action="store_true",
        help="the recipe and one variant per declared change reverted, each over --seeds (default 1-3); writes stepN_ablation.*")
    add("--jobs", type=_positive(int), default=1, help="with --seeds or --ablate: train in this many worker processes")
    return parser


def parse_args(step, argv=None):
    parser = build_parser(step)
    args = parser.parse_args(argv)
    if args.seeds:
        args.seeds = [s for group in args.seeds for s in group]
        twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        if twice:
            parser.error(f"argument --seeds: seed {twice[0]} is given twice; each seed runs once")
    if args.device != "auto" and device_problem(args.device):
        parser.error(f"argument --device: {device_problem(args.device)}")
    if args.eval is not None and (args.seeds or args.ablate):
        parser.error("--eval tests saved weights; it does not train, so it takes no --seeds or --ablate")
    if args.jobs > 1 and not (args.seeds or args.ablate):
        parser.error("--jobs splits --seeds or --ablate runs between processes; pass one of them")
    if args.ablate and not step.changes:
        parser.error(f"--ablate: step {step.number} declares no changes against a previous step")
    return args


def device_problem(name):
    """Why `name` (cpu, cuda, cuda:N) cannot be used here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"unknown device {name!r}; use auto, cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"{name!r} is not supported; use auto, cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine; use --device cpu"
    return None


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_log_dir(run):
    """Create the log folder if missing, lock it for this run (run.lock) and clear it of killed
    runs' hidden files; fails before any training if it cannot take our files."""
    path = Path(run.args.log_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--log-dir {path} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        run.lock = lock_log_dir(path)
        write_hidden(path / "write-test", b"", "probe").unlink()
    except OSError as e:
        raise UserError(f"cannot write to --log-dir {path} ({e.strerror}); pass a folder you can write to") from None
    clean_stale(path)
    run.log_dir = path


# ----------------------------------------------------------------------------- main

class Interrupted(KeyboardInterrupt):
    """A terminating signal, raised wherever the run is; args[0] is its number."""


def _interrupt(signum, frame):
    raise Interrupted(signum)


MODES = {"single": run_single, "seeds": run_seeds, "ablation": run_ablation}


def start(run, mode):
    """Load the data (bad data writes nothing), take the log folder, write the header, then run."""
    run.data = load_data(run.args.data_dir or "data", run.device, download=run.args.data_dir is None)
    if run.recipe.batch_size > len(run.data.train_labels):
        raise UserError(f"--batch-size {run.recipe.batch_size} is larger than the "
                        f"{len(run.data.train_labels):,} training images; pass at most that")
    open_log_dir(run)
    for line in header_lines(run, mode, job_threads(run.args.jobs)):
        run.say(line)
    for line in input_warnings(run):
        run.say(line)
        print(line, file=sys.stderr)
    MODES[mode](run)


def main(step, argv=None):
    """Parse flags, then run one mode. Exit 2 on bad flags; 1 on bad input, divergence or an
    unexpected failure; 128 + the signal's number when interrupted (130 for Ctrl-C)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a path that is not UTF-8 still prints
    args = parse_args(step, argv)
    device = pick_device(args.device)
    recipe = dataclasses.replace(step.recipe, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 precision=resolve_precision(args.precision, device))
    mode = "eval" if args.eval is not None else "ablation" if args.ablate else "seeds" if args.seeds else "single"
    run = Run(step, args, recipe, device, f"step{step.number}" + ("" if mode in ("single", "eval") else f"_{mode}"))
    for sig in TERMINATING:
        signal.signal(sig, _interrupt)  # also when started with SIGINT ignored (a background job)
    try:
        _deterministic()
        run_eval(run) if mode == "eval" else start(run, mode)
        for sig in TERMINATING:
            signal.signal(sig, signal.SIG_IGN)  # the run is done: a signal now cannot interrupt the exit
    except BaseException as e:  # noqa: B036 - every way out gets one line, never a traceback
        sys.exit(report_failure(run, e))
    finally:
        if run.lock is not None:
            os.close(run.lock)  # the run, partial files included, is written: the folder is free


def report_failure(run, error):
    """Print the one line a failure gets, keep what the run had, and return the exit status."""
    for sig in TERMINATING:
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the saving
    prog = f"step{run.step.number}.py"
    if isinstance(error, SystemExit):
        return error.code
    if isinstance(error, UserError):
        kept = run.keep_partial(str(error))
        print(f"{prog}: error: {error}" + ("" if kept == "Nothing was written." else f". {kept}"), file=sys.stderr)
        return 1
    if isinstance(error, Diverged):
        kept = run.keep_partial(f"diverged: {error}")
        print(f"{prog}: error: training diverged at epoch {error.epoch}, batch {error.batch} (loss "
              f"{error.loss}); try a lower --lr than {run.recipe.lr:g}. {kept}", file=sys.stderr)
        return 1
    if isinstance(error, KeyboardInterrupt):
        signum = error.args[0] if isinstance(error, Interrupted) else signal.SIGINT
        kept = run.keep_partial(f"interrupted by {signal.Signals(signum).name}")
        print(f"\n{prog}: interrupted ({signal.Signals(signum).name}). {kept}", file=sys.stderr)
        return 128 + signum
    details = traceback.format_exception(error)
    kept = run.keep_partial(f"failed: {type(error).__name__}: {error}", ["".join(details)])
    where = " (its traceback is at the end of the partial log)" if run.lines else ""
    print(f"{prog}: error: unexpected {type(error).__name__}: {str(error).rstrip('.')}{where}. {kept}",
          file=sys.stderr)
    return 1


signal.signal(signal.SIGINT, _handler_before_imports)  # the imports are done
