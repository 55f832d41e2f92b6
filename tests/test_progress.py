"""acomp.progress: a bar on a terminal, plain lines (no carriage returns) in a log file."""

from __future__ import annotations

import io

from acomp.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_plain_lines_every_n_units_and_at_the_end():
    log = io.StringIO()
    bar = Progress(7, "eval blocks", "block", every=3, stream=log)
    for _ in range(7):
        bar.update(1, loss="1.500")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    counts = [line.split(" block (")[0] for line in text.splitlines()]
    assert counts == ["eval blocks: 3/7", "eval blocks: 6/7", "eval blocks: 7/7"]
    assert text.splitlines()[-1].startswith("eval blocks: 7/7 block (100%) in ")
    assert text.splitlines()[-1].endswith(", loss 1.500")


def test_time_based_lines_without_a_total_and_no_repeat_of_the_last_count():
    log = io.StringIO()
    bar = Progress(None, "tokenize", "doc", interval_s=0.0, stream=log)
    bar.update(5)
    bar.update(2)
    bar.close()  # 7 was printed already: no extra line
    assert [line.split(" doc")[0] for line in log.getvalue().splitlines()] == ["tokenize: 5", "tokenize: 7"]


def test_every_zero_and_disabled_print_no_progress_but_write_still_prints(capsys):
    log = io.StringIO()
    quiet = Progress(4, "train", "step", every=0, stream=log)
    off = Progress(4, "train", "step", enabled=False, stream=log)
    for bar in (quiet, off):
        bar.update(4)
        bar.write("step 4 | loss 1.0")
        bar.close()
    assert log.getvalue() == ""
    assert capsys.readouterr().out == "step 4 | loss 1.0\nstep 4 | loss 1.0\n"


def test_on_a_terminal_it_is_a_tqdm_bar_resuming_at_initial():
    tty = Terminal()
    bar = Progress(10, "train", "step", initial=4, every=0, stream=tty)
    assert bar.bar is not None and bar.bar.n == 4
    bar.update(2, loss="0.5")
    assert bar.bar.n == 6
    bar.close()
    assert "train" in tty.getvalue() and "\r" in tty.getvalue()  # the bar's redraws


def test_trainer_log_off_a_terminal_prints_a_line_every_log_every_steps_without_bar_redraws(tmp_path, capsys):
    from acomp.config import config_from_dict
    from acomp.train.metrics import MetricsLog

    logging = {"progress": True, "log_every": 2, "wandb": "disabled"}
    cfg = config_from_dict({"model": {"arch": {"hidden_size": 32}}, "logging": logging})
    log = MetricsLog(tmp_path, cfg, is_main=True, start_step=0, total_steps=5)
    for step in range(1, 6):
        log.log({"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "memory_gib": 0.1})
    log.close()
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == ""
    assert [line.split(" | ")[0] for line in out.splitlines()] == ["step 2/5", "step 4/5"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


def test_corpus_build_into_a_log_file_prints_plain_lines(tmp_path, capfd):
    from acomp.data import build_corpus

    build_corpus(
        "stdlib", tmp_path / "c", train_tokenizer_vocab=300, block_size=64, limit_docs=12, num_workers=1
    )
    out, err = capfd.readouterr()  # file descriptors: the tokenizers trainer writes from Rust
    lines = (out + err).splitlines()
    assert "\r" not in out + err and "" not in lines
    assert any(line.startswith("tokenize: 12/12 doc (100%) in ") for line in lines)
