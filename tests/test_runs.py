import io
import json
import warnings

import pytest
import torch
import yaml

from nas.errors import CheckpointError, ConfigError
from nas.runs import RunDir, check_runs_dir, load_checkpoint, load_state, save_checkpoint


def test_run_folder_is_partial_until_finished(tmp_path):
    run = RunDir(tmp_path, "myspace", "train")
    assert run.path.name.endswith("-myspace-train.partial") and run.path.is_dir()
    run.write_config({"a": (1, 2)})
    run.log_metrics({"step": 1, "loss": torch.tensor(0.5)})
    run.log_metrics({"step": 2})
    final = run.finish({"accuracy": 91.0})
    assert final == run.final and final.is_dir() and not final.name.endswith(".partial")
    assert yaml.safe_load((final / "config.yaml").read_text()) == {"a": [1, 2]}
    lines = (final / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 0.5}, {"step": 2}]
    assert json.loads((final / "summary.json").read_text()) == {"accuracy": 91.0}
    assert "finished" in (final / "log.txt").read_text()
    assert sorted(p.name for p in final.iterdir()) == [
        "config.yaml", "log.txt", "metrics.jsonl", "summary.json"]


def test_same_second_runs_get_distinct_folders(tmp_path):
    a, b = RunDir(tmp_path, "s", "train"), RunDir(tmp_path, "s", "train")
    assert a.path != b.path


def test_user_error_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError):
        with RunDir(tmp_path, "s", "train"):
            raise ConfigError("bad")
    assert list(tmp_path.iterdir()) == []


def test_same_second_race_takes_the_next_name(tmp_path, monkeypatch):
    # Another process makes the name between the existence check and mkdir.
    import nas.runs

    monkeypatch.setattr(nas.runs, "utc_stamp", lambda: "20261201T000000Z")
    real_mkdir, raced = type(tmp_path).mkdir, []

    def mkdir(self, *args, **kwargs):
        if not raced:
            raced.append(self)
            real_mkdir(self, *args, **kwargs)  # the other process wins the name
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir)
    run = RunDir(tmp_path, "s", "train")
    assert run.path.name == "20261201T000000Z-s-train-2.partial" and raced[0].is_dir()


def test_user_error_found_mid_run_keeps_what_the_run_made(tmp_path):
    # An unreadable image is found only when its batch loads: the checkpoints made so far
    # stay, and the one-line message says where.
    with pytest.raises(ConfigError) as err:
        with RunDir(tmp_path, "s", "train") as run:
            run.write_config({"a": 1})
            run.log_metrics({"epoch": 1})
            raise ConfigError("image x.jpg cannot be read")
    (folder,) = tmp_path.iterdir()
    assert str(err.value) == f"image x.jpg cannot be read (the run so far is kept in {folder})"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "log.txt",
                                                        "metrics.jsonl"]


def test_crash_keeps_the_partial_folder_with_its_log(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunDir(tmp_path, "s", "train"):
            1 / 0
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith(".partial")
    assert "ZeroDivisionError" in (folder / "log.txt").read_text()


def test_checkpoint_roundtrip_and_no_temporary_left(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"space": {"name": "s"}, "state_dict": {"w": torch.ones(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_refuses_code_and_garbage(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"space": {}, "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    # Not torch's advice to load with weights_only=False, which would run the file's code.
    assert str(err.value) == (f"checkpoint {path} cannot be loaded (it holds a Python object, "
                              f"print, not only tensors and plain data); it is corrupt "
                              f"or not a nas checkpoint; pass the best.pt of a 'nas train' run "
                              f"folder")
    # Bytes before a zip's end pass as a zip: torch's own reason, first sentence only.
    good = io.BytesIO()
    torch.save({"w": torch.ones(1)}, good)
    glued = tmp_path / "glued.pt"
    glued.write_bytes(b"\x80" * 64 + good.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the odd pickle stays inside
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(glued)
    assert "weights_only" not in str(err.value) and "it is corrupt or not a nas" in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "junk.pt")
    assert str(err.value) == (f"checkpoint {tmp_path / 'junk.pt'} is not a torch checkpoint (a "
                              f"zip file); it is corrupt or not a nas checkpoint; pass the best.pt "
                              f"of a 'nas train' run folder")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a nas checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_checkpoint_of_another_kind_or_format_is_named(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint(path, {"format": "nas-supernet/1", "space": {}, "supernet": {}})
    expect = {"format": "nas-checkpoint/1", "kind": "fp32"}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expect=expect, fix="pass a best.pt")
    assert str(err.value) == (f"checkpoint {path} has format 'nas-supernet/1' where "
                              f"'nas-checkpoint/1' is expected; pass a best.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a file; pass a best.pt"):
        load_checkpoint(tmp_path, fix="pass a best.pt")


def test_load_state_names_the_first_mismatch():
    model = torch.nn.Linear(2, 3)
    state = model.state_dict()
    cases = [({"weight": state["weight"]}, "it lacks bias"),
             ({**state, "extra": torch.ones(1)}, "it has extra, which the model lacks"),
             ({**state, "bias": torch.ones(4)}, "bias is (4,) in it but (3,) in the model")]
    for bad, problem in cases:
        with pytest.raises(CheckpointError) as err:
            load_state(model, bad, "checkpoint c.pt", "model m")
        assert str(err.value) == f"checkpoint c.pt does not fit model m: {problem}"
    moved = {k: v + 1 for k, v in state.items()}
    load_state(model, moved, "c", "m")
    assert torch.equal(model.bias, moved["bias"])


def test_runs_dir_is_checked_without_being_made(tmp_path):
    check_runs_dir(tmp_path / "new" / "runs")  # can be made: nothing is left behind
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_runs_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match=f"cannot be made: {tmp_path / 'file'} is a file"):
        check_runs_dir(tmp_path / "file" / "runs")
