"""Plant known bugs in a copy of the repository, one at a time, and check that the tests named for each one fail.

    python scripts/check_mutants.py          # the fast mutants (about a minute on 2 cores): CI runs these
    python scripts/check_mutants.py --all    # and those whose tests train under torchrun (several minutes)
    python scripts/check_mutants.py --list

A mutant is a source edit (a text that must occur exactly once, and its replacement) and the tests that must fail
with it. The copy holds the working tree's files that git knows of (tracked, or untracked and not ignored), so the
repository itself is never edited. First the named tests run on the unchanged copy: they must pass there. Exit
status 0 when every mutant was caught, 1 when a test let one through, a test failed without a mutant, or an edit no
longer applies (the source changed: update the mutant).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple
    slow: bool = False  # its tests run the trainer under torchrun


T = "tests/test_timing.py::"
E = "tests/test_hopper_emulated.py::test_forward_and_backward_match_fp64"
MUTANTS = [
    Mutant("weight decay on the 1-D parameters instead of the matrices", "train_gpt2.py",
           "decayed[cfg.decay_all_params or p.dim() >= 2]", "decayed[cfg.decay_all_params or p.dim() < 2]",
           ("tests/test_train.py::test_weight_decay_falls_on_the_matrices_alone_and_one_adamw_step_is_the_hand_computed_one",)),
    Mutant("gradient clipping removed", "train_gpt2.py", "    if grad_clip:\n", "    if False:\n",
           ("tests/test_train.py::test_a_step_clips_the_gradient_norm_it_reports",)),
    Mutant("each step's time from its own start, not from the end of the step before", "training/timing.py",
           "return self.clock.mark() if self.last_end is None else self.last_end", "return self.clock.mark()",
           (T + "test_rows_tile_the_stream_and_none_is_below_its_gpu_time",)),
    Mutant("a step's end marked when the host reads its figures", "training/timing.py",
           "        self.clock.wait(end)\n", "        end = self.clock.mark()\n        self.clock.wait(end)\n",
           (T + "test_rows_tile_the_stream_and_none_is_below_its_gpu_time",)),
    Mutant("the summary's window from the absolute step, not the run's start step", "training/metrics.py",
           'r["step"] >= start_step + timing_warmup', 'r["step"] >= timing_warmup',
           (T + "test_the_summary_after_a_resume_is_the_stream_time_of_its_window",)),
    Mutant("the ETA from the last step's time", "training/metrics.py",
           "* sum(recent) / len(recent)", "* dt", (T + "test_the_eta_is_the_running_mean_of_the_steps_after_the_warm_up",)),
    Mutant("a step after an evaluation, a checkpoint or the trace timed from the step before it", "train_gpt2.py",
           "        if pause:  # the next", "        if False:  # the next",
           ("tests/test_train.py::test_no_row_takes_in_an_evaluation",)),
    Mutant("evaluation in training mode on the bf16 copy", "train_gpt2.py",
           "    for m in (model.raw, model.eval):  # with", "    for m in (model.raw,):  # with",
           ("tests/test_train.py::test_every_evaluation_runs_in_eval_mode_on_whichever_copy_runs_it",)),
    Mutant("a restored data position past what this loader's step can read", "data/loader.py",
           "wrap as it would\n            self.pos = 0", "wrap as it would\n            pass",
           ("tests/test_reliability.py::test_a_position_near_the_end_of_the_data_restored_for_a_larger_step_wraps",)),
    Mutant("the tl forward's causal mask letting each row see the next key", "attention/triton.py",
           "qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk,", "qk = tl.where(offs_m[:, None] + 1 >= offs_n[None, :], qk,",
           ("tests/test_triton_attention.py::test_every_config[0]",)),
    Mutant("the tl dK/dV kernel's dS without delta", "attention/triton.py",
           "dsT = pT * (dpT - delta[None, :])", "dsT = pT * dpT",
           ("tests/test_triton_attention.py::test_every_config[0]",)),
    Mutant("a kept TMA descriptor given to a tensor with other strides at the same address", "attention/triton.py",
           "key = (x.data_ptr(), x.shape, x.stride(), desc.block", "key = (x.data_ptr(), x.shape, desc.block",
           ("tests/test_triton_attention.py::test_a_kept_tma_descriptor_is_one_encoding_anew_would_give",)),
    Mutant("the Gluon backward (not bitwise repeatable) although deterministic gradients were asked for",
           "attention/triton.py", "and not deterministic()", "and True",
           ("tests/test_hopper_kernel.py::test_backward_choice_on_sm90",)),
    Mutant("the Gluon forward's V slot released before its P V wgmma has finished", "attention/hopper.py",
           "        acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v])[0]\n        mbarrier.arrive(v_empty.index(prev))\n",
           "        mbarrier.arrive(v_empty.index(prev))\n        acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v])[0]\n",
           (E,)),
    Mutant("the Gluon forward's P not kept alive until its P V wgmma completes (v15's NaN, suspected)", "attention/hopper.py",
           "        acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v])[0]\n        mbarrier.arrive(v_empty",
           "        acc = warpgroup_mma_wait(0, deps=[acc_tok, v])[0]\n        mbarrier.arrive(v_empty", (E,)),
    Mutant("the Gluon forward's producer waiting for the wrong phase of a slot's release", "attention/hopper.py",
           "        free = ((i // STAGES) & 1) ^ 1\n        start_n", "        free = (i // STAGES) & 1\n        start_n", (E,)),
    Mutant("the Gluon backward's dQ tile rewritten before its TMA reduce-add has read it", "attention/hopper.py",
           "    tma.store_wait(0)  # the previous step's dQ", "    # the previous step's dQ", (E,)),
    Mutant("HellaSwag skipped on this rank's own stop flag, not on what every rank agrees on", "train_gpt2.py",
           "if cfg.hellaswag and not any_rank(stop.signalled, world, device):", "if cfg.hellaswag and not stop.signalled:",
           ("tests/test_reliability.py::test_a_stop_on_one_rank_during_an_evaluation_with_hellaswag_stops_every_rank_cleanly",),
           slow=True),
    Mutant("a resume on another number of processes keeps the setting, not the tokens per step", "training/checkpoints.py",
           "    if before != after:\n", "    if False:\n",
           ("tests/test_reliability.py::test_resume_on_another_number_of_processes_keeps_the_tokens_per_step",), slow=True),
    Mutant("the last evaluation before the final update", "train_gpt2.py",
           "step == cfg.max_steps)", "step == cfg.max_steps - 1)",
           ("tests/test_full_training.py::test_evaluation_and_sampling_with_the_model_compiled",), slow=True),
    Mutant("with overlap_steps, a checkpoint saved before its step's figures are read", "train_gpt2.py",
           "pause = evaluates(cfg, step + 1) or saves_after(cfg, step) or", "pause = evaluates(cfg, step + 1) or",
           ("tests/test_reliability.py::test_with_overlap_steps_a_nan_or_a_stop_is_acted_on_a_step_later",), slow=True),
    Mutant("gradients never all-reduced: no_sync on every micro-step", "train_gpt2.py",
           "if world > 1 and micro < accum - 1 else", "if world > 1 and micro < accum else",
           ("tests/test_full_training.py::test_two_ranks_equal_one_process_with_two_micro_steps",), slow=True),
    Mutant("every rank reads rank 0's window of the data", "data/loader.py",
           "self._read(self.pos + self.rank * B * T, B * T + 1)", "self._read(self.pos, B * T + 1)",
           ("tests/test_train.py::test_two_ranks_match_one_process_with_the_same_global_batch",), slow=True),
    Mutant("the logged training loss summed over the ranks, not averaged", "train_gpt2.py",
           "loss_sum / (accum * world)", "loss_sum / accum",
           ("tests/test_train.py::test_two_ranks_match_one_process_with_the_same_global_batch",), slow=True),
    Mutant("the validation loss of rank 0's rows alone", "train_gpt2.py",
           "        dist.all_reduce(total)\n    return total.item() / (batches * world)",
           "        pass\n    return total.item() / batches",
           ("tests/test_after_training.py::test_evaluate_two_processes_equal_one",), slow=True),
    Mutant("every rank initialised from a seed of its own (with bf16_params its fp32 masters differ)", "train_gpt2.py",
           "    torch.manual_seed(cfg.seed)\n    torch.set_float32", "    torch.manual_seed(cfg.seed + rank)\n    torch.set_float32",
           ("tests/test_train.py::test_two_ranks_with_bf16_params_match_one_process",), slow=True),
    Mutant("a non-finite loss not acted on", "train_gpt2.py", "if not math.isfinite(loss):", "if False:",
           ("tests/test_reliability.py::test_nan_on_one_rank_stops_every_rank_without_saving_it",), slow=True),
]


def copy_tree(dest):
    """The working tree's files that git knows of, into dest."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for rel in filter(None, sorted(set(listed.split("\0")))):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def pytest(copy, tests):
    """pytest's exit status on `tests` in the copy: 0 passed, 1 a test failed, other: it could not run them."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *tests], cwd=copy,
                          capture_output=True, text=True).returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="also the mutants whose tests train under torchrun")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, and exit")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if args.all or not m.slow]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}{' (--all)' if m.slow else ''}: {m.path}; caught by {', '.join(m.tests)}")
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as copy:
        copy_tree(copy)
        problems = []
        for m in mutants:
            text = open(os.path.join(copy, m.path)).read()
            if text.count(m.old) != 1:
                problems.append(f"edit no longer applies: {m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.path}")
        tests = sorted({t for m in mutants for t in m.tests})
        if not problems and pytest(copy, tests) != 0:
            problems.append(f"the tests fail without a mutant: python -m pytest {' '.join(tests)}")
        if problems:
            sys.exit("error: " + "; ".join(problems))
        survived = []
        for m in mutants:
            path = os.path.join(copy, m.path)
            original = open(path).read()
            with open(path, "w") as f:
                f.write(original.replace(m.old, m.new))
            status = pytest(copy, m.tests)
            with open(path, "w") as f:
                f.write(original)
            verdict = {0: "SURVIVED", 1: "caught"}.get(status, f"tests could not run (pytest exit status {status})")
            print(f"{verdict:8s}  {m.name} ({m.path})", flush=True)
            if status != 1:
                survived.append(m.name)
    print(f"{len(mutants) - len(survived)} of {len(mutants)} mutants caught in {time.perf_counter() - started:.0f} s")
    if survived:
        sys.exit(f"error: not caught: {'; '.join(survived)}")


if __name__ == "__main__":
    main()
