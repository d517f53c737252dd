"""Mutation harness: plant one bug at a time in a copy of the repository and check that the named tests fail.

Each entry of :data:`MUTATIONS` is a deliberate bug in one of the package's headline claims (exact resume, O(1)
sampler resume, the IoU rule, the real-token fraction training gets, the hand-off refusal, the second-signal
abort, the per-epoch reshuffle, the non-finite skip, and a few more): a file, an exact piece of its text and what
replaces it, what the bug means, and the tests that must catch it. For each, the harness copies the repository
(committed code, ``git archive``; ``--worktree`` for the working tree) into a temporary directory, applies the
mutation there, runs the named tests with this Python and the copy first on ``sys.path`` (``PYTHONPATH``, which
the launcher's ranks inherit too; the harness checks that the copy's ``rmpl_ds`` is the one imported), and records
which of them failed. A mutation is caught when pytest exits 1 (a test failed, not a collection or usage
error); the unmutated copy must pass the same tests first (the baseline), so a failure is the mutation's doing.

Run on demand, not in CI (the resume mutations run the slow launcher tests, ~2-3 min each)::

    .venv/bin/python tests/mutations/run.py                  # all; writes tests/mutations/results.md
    .venv/bin/python tests/mutations/run.py --fast           # only the mutations whose tests are all fast
    .venv/bin/python tests/mutations/run.py --only iou_exclusive skip_never_reported

Exit status: 0 when every mutation run was caught, 1 otherwise, 2 when the harness itself could not run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where the launcher tests the mutations name live (the real deepspeed launcher, 2 ranks: 1-3 min each); the
# test_reliability.py tests named here are its fast, single-process ones.
SLOW_FILES = ("tests/test_train.py",)


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    meaning: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root

    @property
    def slow(self) -> bool:
        return any(test.startswith(SLOW_FILES) for test in self.tests)


RESUME_SIGTERM = "tests/test_train.py::test_exact_resume_after_sigterm"
RESUME_KILL_9 = "tests/test_train.py::test_exact_resume_after_kill_9_of_one_rank"
PACKAGE_RESUME = "tests/test_engine_units.py::test_resume_restores_step_weights_optimizer_rng_sampler_and_health"
LOADER_RESUME = "tests/test_loader.py::test_resume_gives_the_uninterrupted_batches_for_any_world_and_workers"
MIXING_RESUME = "tests/test_mixing.py::test_resume_reproduces_the_uninterrupted_run_across_layouts"
IOU_DEFAULT = "tests/test_scorer.py::test_the_default_iou_threshold_is_0_5_inclusive"
REAL_TOKENS = "tests/test_collate.py::test_real_token_fraction_training_gets_on_the_demo_mixture"
NAN_SKIP = "tests/test_engine_units.py::test_a_step_with_a_non_finite_loss_is_skipped_and_said_so"

MUTATIONS: tuple[Mutation, ...] = (
    # -- exact resume --------------------------------------------------------------------------------------------
    Mutation(
        "never_resumes",
        "exact resume",
        "rmpl_ds/train.py",
        "ref = checkpoint.find(paths.checkpoint_root, args.resume)",
        'ref = checkpoint.find(paths.checkpoint_root, "none")',
        "the checkpoint lookup finds nothing: every run silently starts over from step 0",
        (RESUME_SIGTERM, RESUME_KILL_9),
    ),
    Mutation(
        "loader_restarts_at_slot_0",
        "exact resume",
        "rmpl_ds/train.py",
        "loader = data.loader(next_slot=next_slot,",
        "loader = data.loader(next_slot=0,",
        "a resumed run restores the weights but feeds the data from the first slot again",
        (RESUME_SIGTERM,),
    ),
    Mutation(
        "rng_not_restored",
        "exact resume",
        "rmpl_ds/train.py",
        '        engine.restore_rng(state["rng"][dist.rank()])\n',
        "        pass\n",
        "resume keeps the RNG state of the fresh process (dropout masks differ from the uninterrupted run)",
        (PACKAGE_RESUME, RESUME_SIGTERM),
    ),
    Mutation(
        "resume_returns_slot_0",
        "exact resume",
        "rmpl_ds/train.py",
        'return int(state["step"]), int(next_slot), Health.from_state(state, int(state["step"]))',
        'return int(state["step"]), 0, Health.from_state(state, int(state["step"]))',
        "resume loses the sampler position: the data start again at slot 0",
        (PACKAGE_RESUME,),
    ),
    Mutation(
        "resume_picks_the_oldest_checkpoint",
        "exact resume",
        "rmpl_ds/checkpoint.py",
        "        reverse=True,\n",
        "        reverse=False,\n",
        "--resume auto takes the oldest sealed checkpoint",
        ("tests/test_engine_units.py::test_checkpoints_are_sealed_pruned_and_verified",),
    ),
    # -- O(1) sampler resume -------------------------------------------------------------------------------------
    Mutation(
        "sampler_resume_restarts_draws",
        "O(1) sampler resume",
        "rmpl_ds/mixing.py",
        'return (self if self.origin == state["origin"] else self.with_origin(int(state["origin"]))), next_slot',
        "return self.with_origin(next_slot), next_slot",
        "the sampler's resume restarts every per-source draw and source-epoch at the resumed slot",
        (LOADER_RESUME, PACKAGE_RESUME, MIXING_RESUME),
    ),
    Mutation(
        "rank_sampler_ignores_next_slot",
        "O(1) sampler resume",
        "rmpl_ds/loader.py",
        "return rank_batches(self.next_slot, self.global_batch, self.world, self.micro, self.rank)",
        "return rank_batches(0, self.global_batch, self.world, self.micro, self.rank)",
        "each rank's batch sampler starts at slot 0 whatever the saved next slot",
        (LOADER_RESUME,),
    ),
    Mutation(
        "draws_counted_by_scanning",
        "O(1) sampler resume",
        "rmpl_ds/mixing.py",
        "draw = segment.draws_at_start[stream_index] + segment.schedule.count_before(offset, stream_index)",
        "draw = segment.draws_at_start[stream_index] + int((segment.schedule.sources(0, offset) == stream_index)"
        ".sum())",
        "a slot's draw is counted by scanning every slot before it: resume costs O(slot), not O(1)",
        ("tests/test_mixing.py::test_state_is_constant_size_and_resume_is_constant_time",),
    ),
    # -- the IoU rule ----------------------------------------------------------------------------------------------
    Mutation(
        "iou_default_0_4",
        "IoU >= 0.5 by default",
        "rmpl_ds/evaluate/m2e2.py",
        "DEFAULT_IOU_THRESHOLD = 0.5",
        "DEFAULT_IOU_THRESHOLD = 0.4",
        "the default IoU threshold moves to 0.4",
        (IOU_DEFAULT,),
    ),
    Mutation(
        "iou_exclusive",
        "IoU >= 0.5 by default",
        "rmpl_ds/evaluate/m2e2.py",
        "if iou >= threshold:",
        "if iou > threshold:",
        "a box at IoU exactly 0.5 no longer matches",
        (IOU_DEFAULT, "tests/test_scorer.py::test_iou_exactly_at_the_threshold_matches"),
    ),
    # -- the real-token fraction training gets -------------------------------------------------------------------
    Mutation(
        "pad_to_max_seq_len",
        "real-token fraction",
        "rmpl_ds/data.py",
        "StageCollator(bundle.collator())",
        "StageCollator(bundle.collator(pad_to_multiple_of=recipe.model.max_seq_len))",
        "the training collator pads every micro-batch to max_seq_len (0.83 -> 0.35 real tokens)",
        (REAL_TOKENS,),
    ),
    Mutation(
        "stats_ignore_padding",
        "real-token fraction",
        "rmpl_ds/collate.py",
        "slots=len(rows) * length,",
        'slots=sum(len(row["input_ids"]) for row in rows),',
        "the logged real-token fraction leaves the padding out (reports ~1.0 whatever the padding)",
        (REAL_TOKENS,),
    ),
    # -- hand-off -----------------------------------------------------------------------------------------------
    Mutation(
        "handoff_accepts_modified_files",
        "hand-off refusal",
        "rmpl_ds/handoff.py",
        'if manifest["files"].get(name) != actual.get(name):',
        "if name not in actual:",
        "Stage II accepts an export whose files changed after Stage I wrote it (only missing files are noticed)",
        (
            "tests/test_engine_units.py::test_handoff_export_is_verified",
            "tests/test_train.py::test_stage2_starts_from_exactly_stage1s_weights",
        ),
    ),
    Mutation(
        "handoff_refusal_crashes",
        "hand-off refusal for the right reason",
        "rmpl_ds/handoff.py",
        'raise UserError(f"{directory / name}: {what} (a partial or altered export)',
        'raise RuntimeError(f"{directory / name}: {what} (a partial or altered export)',
        "a changed export still stops Stage II, but as a crash (exit 1, traceback) instead of bad input (exit 2)",
        (
            "tests/test_engine_units.py::test_handoff_export_is_verified",
            "tests/test_train.py::test_stage2_starts_from_exactly_stage1s_weights",
        ),
    ),
    # -- signals ------------------------------------------------------------------------------------------------
    Mutation(
        "second_signal_does_not_abort",
        "second-signal abort",
        "rmpl_ds/engine.py",
        "        os._exit(128 + signum)\n",
        "",
        "a second SIGTERM / SIGINT after the repeat window is ignored instead of aborting",
        (
            "tests/test_engine_units.py::test_graceful_stop_one_request_then_abort_on_a_later_signal",
            "tests/test_reliability.py::test_a_second_signal_after_the_window_aborts_at_once",
        ),
    ),
    Mutation(
        "repeat_window_inverted",
        "second-signal abort",
        "rmpl_ds/engine.py",
        "if now - self._first_at < self._window:",
        "if now - self._first_at >= self._window:",
        "the launcher's forwarded copy of the same Ctrl-C aborts the run; a later signal is ignored",
        (
            "tests/test_engine_units.py::test_graceful_stop_one_request_then_abort_on_a_later_signal",
            "tests/test_reliability.py::test_a_repeated_signal_within_the_window_is_the_same_request",
        ),
    ),
    Mutation(
        "stop_request_not_shared",
        "graceful stop (every rank stops after the same step)",
        "rmpl_ds/train.py",
        "sums[2 * n_streams + 3] = float(stop_requested)",
        "sums[2 * n_streams + 3] = 0.0",
        "a rank's stop request never reaches the step's reduction: SIGTERM does not stop the loop",
        (NAN_SKIP,),
    ),
    # -- per-epoch reshuffle -----------------------------------------------------------------------------------
    Mutation(
        "same_order_every_epoch",
        "per-epoch reshuffle",
        "rmpl_ds/mixing.py",
        "entropy = [seed, stable_id(name), origin, epoch]",
        "entropy = [seed, stable_id(name), origin, 0]",
        "every source-epoch visits the samples in the same order",
        ("tests/test_mixing.py::test_every_source_epoch_is_a_fresh_shuffle_of_its_source",),
    ),
    Mutation(
        "per_slot_path_reuses_epoch_0",
        "per-epoch reshuffle",
        "rmpl_ds/mixing.py",
        "self.seed, self.names[stream_index], epoch, self.sizes[stream_index], origin=self.origin",
        "self.seed, self.names[stream_index], 0, self.sizes[stream_index], origin=self.origin",
        "the loader's per-slot path (resolve) reuses epoch 0's order for every epoch",
        ("tests/test_mixing.py::test_every_source_epoch_is_a_fresh_shuffle_of_its_source",),
    ),
    # -- non-finite skip ---------------------------------------------------------------------------------------
    Mutation(
        "poison_is_identity",
        "non-finite skip",
        "rmpl_ds/engine.py",
        "    return loss * scale\n",
        "    return loss\n",
        "a non-finite loss is back-propagated as it is (its gradients need not be NaN, so the step may be applied)",
        ("tests/test_engine_units.py::test_a_non_finite_loss_poisons_every_gradient_and_a_finite_one_none",),
    ),
    Mutation(
        "skip_never_reported",
        "non-finite skip",
        "rmpl_ds/train.py",
        '"skipped": not applied,',
        '"skipped": False,',
        "a step DeepSpeed skipped is logged and counted as applied (no bad-step count, no exit 3)",
        (NAN_SKIP,),
    ),
    Mutation(
        "applied_non_finite_step_accepted",
        "non-finite skip",
        "rmpl_ds/train.py",
        "if non_finite and applied:",
        "if False:",
        "a NaN step that DeepSpeed applied (overflow check off) goes unnoticed",
        ("tests/test_engine_units.py::test_a_non_finite_step_that_deepspeed_applied_is_refused",),
    ),
    Mutation(
        "bad_steps_in_a_row_reset",
        "non-finite skip",
        "rmpl_ds/train.py",
        "return Health(self.bad_steps + 1, self.in_a_row + 1, self.last_good_step)",
        "return Health(self.bad_steps + 1, 1, self.last_good_step)",
        "skipped steps in a row are never more than 1: max_bad_steps never stops a diverged stage",
        ("tests/test_engine_units.py::test_bad_steps_in_a_row_are_counted_and_survive_a_checkpoint",),
    ),
    # -- other claims ------------------------------------------------------------------------------------------
    Mutation(
        "tampered_checkpoint_accepted",
        "sealed checkpoints refuse tampering",
        "rmpl_ds/checkpoint.py",
        "if expected.get(name) != actual.get(name):",
        "if name not in actual:",
        "a checkpoint file changed after it was sealed is loaded anyway (only missing files are noticed)",
        ("tests/test_engine_units.py::test_checkpoints_are_sealed_pruned_and_verified",),
    ),
    Mutation(
        "no_dummy_image",
        "every rank runs the vision tower every step",
        "rmpl_ds/collate.py",
        "use_dummy = not image_sources and self.dummy_image is not None",
        "use_dummy = False",
        "a text-only micro-batch gets no dummy image (under ZeRO its rank would hang in the tower's reduction)",
        ("tests/test_collate.py::test_dummy_image_goes_to_the_shortest_row_of_a_text_only_batch",),
    ),
    # -- the other methods' training strategies ---------------------------------------------------------------
    Mutation(
        "dwa_state_not_restored",
        "DWA weights survive a stop and resume",
        "rmpl_ds/weighting.py",
        'if not self.dynamic or not state or list(state.get("names", ())) != list(self.names):',
        "if True:",
        "a resumed run starts the DWA windows over: its loss weights differ from the uninterrupted run's",
        ("tests/test_weighting.py::test_state_through_a_checkpoint_gives_the_same_weights_bitwise", RESUME_SIGTERM),
    ),
    Mutation(
        "dwa_weights_not_applied",
        "DWA moves the stream loss weights",
        "rmpl_ds/train.py",
        "stream_factors=weights.factors if weights.dynamic else None,",
        "stream_factors=None,",
        "the DWA weights are computed and logged but every sample keeps its fixed loss weight",
        ("tests/test_train.py::test_stage_run_logs_checkpoints_and_exports",),
    ),
    Mutation(
        "later_options_never_fingerprinted",
        "a changed stage is refused on resume and hand-off",
        "rmpl_ds/config.py",
        "if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}",
        "if k not in LATER_DEFAULTS}",
        "turning DWA or schema-guided prompts on leaves the checkpoint and export fingerprints unchanged",
        (
            "tests/test_weighting.py::"
            "test_the_new_options_at_their_defaults_keep_the_fingerprints_of_older_checkpoints_and_exports",
        ),
    ),
    Mutation(
        "pseudo_keeps_disagreeing_pairs",
        "pseudo-labels keep only pairs whose caption and image agree",
        "rmpl_ds/pseudo.py",
        "agreed = tuple(t for t in EVENT_TYPES if t in text_em.event_types and t in image_em.event_types)",
        "agreed = tuple(t for t in EVENT_TYPES if t in text_em.event_types or t in image_em.event_types)",
        "a pair is kept when either side names a type (the union instead of the agreement)",
        ("tests/test_pseudo.py::test_decide",),
    ),
    Mutation(
        "pseudo_ignores_image_confidence",
        "pseudo-labels keep only confident answers",
        "rmpl_ds/pseudo.py",
        "    if not image_conf >= threshold:",
        "    if False:",
        "an unconfident image answer is kept",
        ("tests/test_pseudo.py::test_decide",),
    ),
    Mutation(
        "joint_missing_header_not_counted",
        "the joint task's answers are parsed strictly",
        "rmpl_ds/tasks.py",
        "errors = (first is None) + (second is None) + bool(stray.strip())",
        "errors = bool(stray.strip())",
        "a joint answer without its headers parses as clean",
        ("tests/test_strategy_tasks.py::test_joint_answers_with_missing_headers_and_stray_text",),
    ),
    Mutation(
        "schema_guided_not_used_in_evaluation",
        "evaluation asks as the model was trained",
        "rmpl_ds/evaluate/infer.py",
        "                schema_guided=schema_guided,\n            )\n            for n in positions",
        "                schema_guided=False,\n            )\n            for n in positions",
        "an export trained with schema-guided prompts is evaluated with plain ones",
        ("tests/test_eval.py::test_an_export_trained_with_schema_guided_prompts_is_evaluated_with_them",),
    ),
    Mutation(
        "loss_ignores_stream_weights",
        "the mixture's per-stream loss weights",
        "rmpl_ds/loss.py",
        "loss = (per_sample * weights).sum() / per_sample.numel()",
        "loss = per_sample.sum() / per_sample.numel()",
        "every stream's loss weight is ignored",
        ("tests/test_loss.py",),
    ),
)


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    mutation: Mutation
    caught: bool
    detail: str
    failed: dict[str, str] = field(default_factory=dict)  # test id -> the first line of its failure
    seconds: float = 0.0


def make_copy(destination: Path, worktree: bool, revision: str) -> str:
    """Copy the repository into ``destination``: the committed ``revision`` or the working tree (tracked and
    untracked files git does not ignore). Returns a description of what was copied."""
    destination.mkdir(parents=True)
    if worktree:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout.decode()
        for name in filter(None, listing.split("\0")):
            source = ROOT / name
            if source.is_file():
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination / name)
        return "the working tree"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    return f"commit {commit}"


def environment(copy: Path) -> dict[str, str]:
    shared = next((p for p in (ROOT.parent / "shared", ROOT / "shared") if (p / "fixtures").is_dir()), None)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    if shared is not None and "RMPL_SHARED_DIR" not in os.environ:
        env["RMPL_SHARED_DIR"] = str(shared)
    return env


def imported_from(copy: Path, env: dict[str, str]) -> Path:
    found = subprocess.run(
        [sys.executable, "-c", "import rmpl_ds; print(rmpl_ds.__file__)"],
        cwd=copy,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Path(found).resolve()


def run_tests(
    copy: Path, env: dict[str, str], tests: list[str], label: str, scratch: Path
) -> tuple[int, dict[str, str], str]:
    """Run ``tests`` in ``copy``; returns pytest's exit code, the tests that failed or errored (id -> the first line
    of the failure), and the tail of the output."""
    report = scratch / f"{label}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(scratch / label)]
    command += ["--junitxml", str(report), "-o", "junit_family=xunit1", *tests]
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    failed = {}
    if report.is_file():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                message = (problem.get("message") or problem.text or "").strip().splitlines()
                failed[f"{case.get('file', case.get('classname'))}::{case.get('name')}"] = message[0] if message else ""
    return result.returncode, failed, (result.stdout + result.stderr)[-3000:]


def apply(copy: Path, mutation: Mutation) -> str:
    """Write the mutated file into ``copy``; returns the original text (to restore). Raises ValueError when the
    mutation no longer applies (its text is gone or ambiguous) or does not compile."""
    path = copy / mutation.path
    original = path.read_text(encoding="utf-8")
    count = original.count(mutation.old)
    if count != 1:
        raise ValueError(f"{mutation.path}: the text to mutate occurs {count} times (expected once)")
    mutated = original.replace(mutation.old, mutation.new)
    try:
        compile(mutated, str(path), "exec")
    except SyntaxError as error:
        raise ValueError(f"{mutation.path}: the mutated file does not compile: {error}") from None
    path.write_text(mutated, encoding="utf-8")
    return original


def markdown(outcomes: list[Outcome], context: dict[str, str]) -> str:
    caught = sum(outcome.caught for outcome in outcomes)
    lines = [
        "# Mutation harness: planted bugs and the tests that catch them",
        "",
        f"- command: `{context['command']}`",
        f"- code: {context['code']}; date: {context['date']}; machine: {context['machine']}",
        f"- baseline (unmutated copy, the union of the named tests): {context['baseline']}",
        f"- **{caught} of {len(outcomes)} caught**; total {context['total']}",
        "",
        'A mutation is caught when at least one of its tests fails (pytest exit 1); "failed" lists those that did, and',
        '"why" is the first line of the first failure (so that a timeout is not taken for a catch).',
        "",
        "| mutation | claim | file | meaning | tests | caught? | why | seconds |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for outcome in outcomes:
        mutation = outcome.mutation
        tests = "<br>".join(f"`{test.split('::')[-1]}`" for test in mutation.tests)
        verdict = "**caught**" if outcome.caught else "**NOT CAUGHT**"
        if outcome.failed:
            failed = dict.fromkeys(test.split("::")[-1].split("[")[0] for test in outcome.failed)  # one per test
            verdict += " (failed: " + ", ".join(f"`{name}`" for name in failed) + ")"
        if outcome.detail:
            verdict += f"; {outcome.detail}"
        why = next(iter(outcome.failed.values()), "")
        why = (why if len(why) <= 140 else why[:137] + "...").replace("|", "\\|").replace("`", "'")
        lines.append(
            f"| `{mutation.name}` | {mutation.claim} | `{mutation.path}` | {mutation.meaning} | {tests} | {verdict} "
            f"| {why} | {outcome.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--fast", action="store_true", help="skip mutations that name a launcher test")
    parser.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, not a commit")
    parser.add_argument("--revision", default="HEAD", help="the commit to copy (default HEAD)")
    parser.add_argument("--no-baseline", action="store_true", help="do not run the tests on the unmutated copy")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"), help="results table")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    names = [mutation.name for mutation in MUTATIONS]
    if len(set(names)) != len(names):
        print("mutations: duplicate names", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        print(f"mutations: unknown names {unknown}; have {names}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if (not args.only or m.name in args.only) and not (args.fast and m.slow)]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name:36} {'slow' if mutation.slow else 'fast'}  {mutation.meaning}")
        return 0

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmpl-mutations-") as scratch_dir:
        scratch = Path(scratch_dir)
        copy = scratch / "repo"
        code = make_copy(copy, args.worktree, args.revision)
        env = environment(copy)
        where = imported_from(copy, env)
        if not where.is_relative_to(copy.resolve()):
            print(f"mutations: the copy imports rmpl_ds from {where}, not from {copy}", file=sys.stderr)
            return 2
        baseline = "skipped (--no-baseline)"
        if not args.no_baseline:
            union = list(dict.fromkeys(test for mutation in chosen for test in mutation.tests))
            started = time.perf_counter()
            returncode, failed, tail = run_tests(copy, env, union, "baseline", scratch)
            if returncode != 0:
                print(f"mutations: the unmutated copy fails its tests (exit {returncode}): {failed}\n{tail}")
                return 2
            baseline = f"{len(union)} tests passed in {time.perf_counter() - started:.0f} s"
            print(f"baseline: {baseline}", flush=True)
        outcomes = []
        for index, mutation in enumerate(chosen):
            started = time.perf_counter()
            try:
                original = apply(copy, mutation)
            except ValueError as error:
                outcomes.append(Outcome(mutation, False, f"does not apply: {error}"))
                print(f"{mutation.name}: DOES NOT APPLY ({error})", flush=True)
                continue
            try:
                returncode, failed, tail = run_tests(copy, env, list(mutation.tests), f"m{index:02d}", scratch)
            finally:
                (copy / mutation.path).write_text(original, encoding="utf-8")
            caught = returncode == 1 and bool(failed)
            detail = "" if returncode in (0, 1) else f"pytest exit {returncode}: {tail.strip().splitlines()[-1]}"
            outcome = Outcome(mutation, caught, detail, failed, time.perf_counter() - started)
            outcomes.append(outcome)
            print(
                f"{mutation.name}: {'caught' if caught else 'NOT CAUGHT'} {failed} ({outcome.seconds:.0f} s)",
                flush=True,
            )

    total = time.perf_counter() - began
    load = os.getloadavg()
    options = " ".join(argv if argv is not None else sys.argv[1:])
    context = {
        "command": f"python tests/mutations/run.py {options}".rstrip(),
        "code": code,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        "baseline": baseline,
        "total": f"{total / 60:.1f} min",
    }
    args.out.write_text(markdown(outcomes, context), encoding="utf-8")
    print(f"{sum(o.caught for o in outcomes)} of {len(outcomes)} caught in {total / 60:.1f} min; table in {args.out}")
    return 0 if all(outcome.caught for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
