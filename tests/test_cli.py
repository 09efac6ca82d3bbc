"""The CLI: the whole flow on the built-in model, file models, and argument errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest

from fx_sparsity.cli import DemoNet, load_model
from fx_sparsity.cli import command as cli


def test_default_run_prints_tables_and_verdict(capsys):
    """No arguments: both tables and an OK verdict, exit 0."""
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "nonzeros / total" in out and ">> MASK conv1.weight_mask" in out
    assert "bytes lowered" in out
    assert out.strip().splitlines()[-1].startswith("OK: 5 weights masked, lowered (fuse) and squashed")


def test_options_and_file_model(tmp_path, capsys):
    """A file.py:ClassName model with 2:4 blocks and an input shape."""
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(16, 8)
            def forward(self, x):
                return self.fc(x)
    """))
    argv = [f"--model={path}:Net", "--input-shape=4,16", "--sparsity-level=1", "--block-shape=1x4",
            "--zeros-per-block=2", "--no-graph"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "50.0%" in out and ">> MASK" not in out and "OK: 1 weights" in out


def test_csr_backend_and_export(tmp_path, capsys):
    """--backend csr --export: Linears run csr_linear, convs are fused, the saved program reloads and matches."""
    path = tmp_path / "demo.pt2"
    assert cli.main(["--backend=csr", f"--export={path}", "--no-graph", "--block-shape=1x1"]) == 0
    out = capsys.readouterr().out
    assert path.exists() and f"exported program written to {path}" in out
    assert "fuse (asked csr)" in out and "3x3 conv: only 1x1 convs" in out
    assert out.strip().splitlines()[-1].startswith("OK: 5 weights masked, lowered (csr) and squashed")


def test_backend_that_cannot_run_here_exits_2(capsys):
    """semi_structured on CPU: exit 2 with the reason."""
    assert cli.main(["--backend=semi_structured", "--no-graph"]) == 2
    assert "2:4 kernels run on CUDA GPUs only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model=nope"], "--model must be"),
        (["--model=missing.py:Net", "--input-shape=1,2"], "no such file"),
        (["--zeros-per-block=9"], "zeros_per_block=9"),
    ],
)
def test_errors_exit_2(argv, message, capsys):
    """Bad models and arguments print an error naming them and exit 2."""
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_block_shape_is_an_argparse_error():
    """--block-shape needs ROWSxCOLS."""
    with pytest.raises(SystemExit):
        cli.main(["--block-shape=1x2x3"])


def test_torchvision_error_is_clear(monkeypatch):
    """Without a usable torchvision, --model torchvision:<name> says so."""
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ValueError, match="needs a working torchvision"):
        load_model("torchvision:resnet18")


def test_module_entry_point():
    """python -m fx_sparsity runs the main job."""
    result = subprocess.run([sys.executable, "-m", "fx_sparsity", "--no-graph"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "OK:" in result.stdout
    assert isinstance(load_model("demo"), DemoNet)


@pytest.mark.parametrize("argv, achieved", [
    (["--method=magnitude", "--sparsity-level=0.75"], "75.0%"),
    (["--method=global", "--sparsity-level=0.6"], "60.0%"),
    (["--method=nm", "--nm=1:4"], "75.0%"),
    (["--method=wanda", "--sparsity-level=0.5", "--calibration-batches=2"], "50.0%"),
    (["--method=wanda", "--nm=2:4"], "50.0%"),
    (["--method=sparsegpt", "--sparsity-level=0.75", "--calibration-batches=2"], "75.0%"),
    (["--method=sparsegpt", "--nm=2:4"], "50.0%"),
])
def test_methods(argv, achieved, capsys):
    """Each --method runs the whole flow (wanda and sparsegpt calibrate first); the total row shows the achieved level,
    and the outputs match the eager model holding the pruned (for sparsegpt, updated) weights."""
    assert cli.main([*argv, "--no-graph", "--no-progress"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert achieved in total
    assert out.strip().splitlines()[-1].startswith("OK: 5 weights masked")


def test_nm_on_cpu_warns_that_it_will_not_run_fast(capsys, monkeypatch):
    """2:4 on a CPU-only machine without the C++ kernels: a warning says lower() will fuse it."""
    monkeypatch.setenv("FX_SPARSITY_NO_NATIVE", "1")
    with pytest.warns(UserWarning, match="2:4 masks run fast only"):
        assert cli.main(["--method=nm", "--no-graph", "--no-progress"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--method=nm", "--nm=4:4"], "0 <= n < m, got n=4, m=4"),
    (["--method=wanda", "--calibration-batches=0"], "--calibration-batches must be at least 1"),
    (["--nm=2:4"], "--nm applies to --method nm, wanda or sparsegpt, not weight-norm"),
    (["--export=/no/such/folder/m.pt2"], "the folder /no/such/folder does not exist"),
    (["--blocksize=4"], "--blocksize applies to --backend bsr or auto, not fuse"),
    (["--input-shape=1,3,8"], "DemoNet failed on an input of shape (1, 3, 8)"),
    (["--model=" + __file__ + ":Nope", "--input-shape=1,2"], "defines no nn.Module class 'Nope'"),
])
def test_method_errors_exit_2(argv, message, capsys):
    """Bad method arguments: exit 2 with the reason."""
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["fuse", "csr", "bsr", "auto"])
def test_every_backend_runs_on_the_built_in_model(backend, capsys):
    """The built-in model runs with each backend this CPU can run, default options otherwise (bsr: square
    blocks of DEFAULT_BSR_BLOCKSIZE, since the default 1x4 block shape is not square)."""
    assert cli.main([f"--backend={backend}", "--no-graph", "--no-progress"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith(f"OK: 5 weights masked, lowered ({backend})")
    if backend == "bsr":
        assert f"bsr {cli.DEFAULT_BSR_BLOCKSIZE}x{cli.DEFAULT_BSR_BLOCKSIZE}" in out


@pytest.mark.parametrize("argv, message", [
    (["--sparsity-level=nan"], "expected a number in [0, 1], got 'nan'"),
    (["--sparsity-level=1.5"], "expected a number in [0, 1], got '1.5'"),
    (["--blocksize=0", "--backend=bsr"], "expected a positive integer, got '0'"),
])
def test_argument_errors_are_one_line_exit_2(argv, message, capsys):
    """Values argparse checks: one line on stderr naming the option, exit 2, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_capture_failure_is_one_line(tmp_path, capsys):
    """A file model that neither symbolic tracing nor torch.export can capture: one line (the causes and the
    remedies), exit 2."""
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 4)
            def forward(self, x):
                if x.sum().item() > 0:
                    return self.fc(x)
                return self.fc(x).relu()
    """))
    assert cli.main([f"--model={path}:Net", "--input-shape=2,4", "--no-progress"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    # torch.export may print the graph it failed on; ours is one line, the last, with the remedies.
    last = err.strip().splitlines()[-1]
    assert last.startswith("fx-sparsity: error: could not capture Net.") and "Remedies:" in last
    assert "Traceback" not in err


def test_nm_runs_on_the_cpu_kernel(capsys, native_kernels):
    """2:4 masks with the C++ kernels built: no warning, and --backend nm lowers every Linear to fx_sparsity::nm_linear
    (the 3x3 convs fuse), matching the masked eager model."""
    if native_kernels is None:
        pytest.skip("the C++ kernels did not build here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["--method=nm", "--backend=nm", "--no-graph", "--no-progress"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.count(" nm ") >= 3 and out.strip().splitlines()[-1].startswith("OK: 5 weights masked, lowered (nm)")


def test_eval_prints_the_error_table_of_each_form(capsys):
    """--eval with SparseGPT and the fuse backend: a table with a row per layer and the output, one error column for
    the prepared and one for the lowered module, equal (fuse computes what the masks do), nonzero (half the weights
    are gone), and the verdict still OK."""
    assert cli.main(["--method=sparsegpt", "--eval", "--no-graph", "--no-progress"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("relative error of each layer's output"))
    assert "4 random batches of shape (2, 3, 32, 32)" in lines[start]
    assert lines[start + 1].split() == ["layer", "prepared", "lowered", "(fuse)", "note"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 3:start + 9]}
    assert list(rows) == ["conv1", "conv2", "proj", "mix", "mix_t", "(output)"]
    for name, (prepared, lowered) in rows.items():
        assert float(prepared) > 0 and float(prepared) == pytest.approx(float(lowered), rel=1e-3), name
    assert out.strip().splitlines()[-1].startswith("OK: 5 weights masked, lowered (fuse) and squashed")


def test_eval_errors_equal_compare_on_the_same_batches(capsys, monkeypatch):
    """--eval's numbers are fx_sparsity.compare's on the batches it draws: the table printed equals compare_table of
    compare(model, gm) recomputed from the same seeded batches, and a model without --eval prints no table."""
    import torch

    from fx_sparsity.report import compare, compare_table

    seen = {}
    real_compare = cli.compare

    def spy(reference, candidate, batches, layers=None):
        batches = list(batches)
        report = real_compare(reference, candidate, batches, layers)
        seen.setdefault("runs", []).append((reference, candidate, batches, report))
        return report

    monkeypatch.setattr(cli, "compare", spy)
    assert cli.main(["--method=magnitude", "--eval", "--no-graph", "--no-progress"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    (model, prepared, batches, first), (_, lowered, batches2, second) = seen["runs"]
    assert batches is batches2 or all(torch.equal(a, b) for a, b in zip(batches, batches2))
    assert len(batches) == 4
    recomputed = compare(model, lowered, batches)
    assert recomputed == second
    assert compare_table({"prepared": first, "lowered (fuse)": second}) in out
    assert cli.main(["--method=magnitude", "--no-graph", "--no-progress"]) == cli.EXIT_OK
    assert "relative error of each layer" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["folder", "empty", "unwritable"])
def test_export_path_that_cannot_be_written_exits_2_before_the_run(kind, tmp_path, capsys):
    """--export to a folder, to '' or to a path that cannot be created (under /sys: os.access says yes to root, but
    no file can be made there): exit 2 with the reason before anything runs (no table printed), and no file left."""
    if kind == "unwritable" and not os.path.isdir("/sys"):
        pytest.skip("needs Linux's /sys")
    path = {"folder": str(tmp_path), "empty": "", "unwritable": "/sys/fx_sparsity_export.pt2"}[kind]
    message = {"folder": f"--export {tmp_path} is a folder", "empty": "--export is empty",
               "unwritable": "--export /sys/fx_sparsity_export.pt2 cannot be written"}[kind]
    assert cli.main([f"--export={path}", "--no-graph", "--no-progress"]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == [] and not os.path.exists("/sys/fx_sparsity_export.pt2")


def test_export_check_leaves_an_existing_file_as_it_was(tmp_path, monkeypatch):
    """The check opens the --export file for appending: an existing file keeps its bytes until the run replaces it,
    and a new path is not created by the check."""
    existing, fresh = tmp_path / "old.pt2", tmp_path / "new.pt2"
    existing.write_bytes(b"earlier run")
    cli._check_export_path(str(existing))
    cli._check_export_path(str(fresh))
    assert existing.read_bytes() == b"earlier run" and sorted(p.name for p in tmp_path.iterdir()) == ["old.pt2"]


def test_failed_export_save_leaves_no_file(tmp_path, monkeypatch):
    """A save that fails half-way (here after writing some bytes) leaves neither the --export file nor its temporary:
    the program is written under a temporary name and renamed onto the path only once complete."""
    import torch

    def broken_save(program, f):
        f.write(b"half a program")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", broken_save)
    path = tmp_path / "m.pt2"
    with pytest.raises(OSError, match="No space left on device"):
        cli.main([f"--export={path}", "--no-graph", "--no-progress"])
    assert list(tmp_path.iterdir()) == []


def test_transformers_folder_pruned_and_saved_sparse(tmp_path, capsys):
    """--model hf:DIR (a tiny Llama that save_pretrained wrote, its cache on) with SparseGPT 2:4 on random token ids,
    lowered to nm and --save'd: exit 0 with the saved-and-loaded check among those passed; the folder loads with
    load_sparse into a LlamaForCausalLM of nm SparseLinears whose logits equal the eager masked model's; the source
    folder's files are unchanged."""
    transformers = pytest.importorskip("transformers")
    from fx_sparsity.deploy import SparseLinear, load_sparse
    from helpers import tiny_causal_lm

    model = tiny_causal_lm("llama")
    model.config.use_cache = True
    model.save_pretrained(tmp_path / "src")
    files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    code = cli.main(["--model", f"hf:{tmp_path / 'src'}", "--method", "sparsegpt", "--nm", "2:4", "--backend", "nm",
                     "--no-graph", "--no-progress", "--save", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out[-2000:]
    assert "saved to" in out and out.rstrip().splitlines()[-1].startswith("OK: 14 weights masked")  # head dense
    loaded = load_sparse(tmp_path / "out")
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert sum(isinstance(m, SparseLinear) and m.layout == "nm" for m in loaded.modules()) == 14
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == files


@pytest.mark.parametrize("make, argv, message", [
    (lambda p: (p / "keep.txt").write_text("x"), ["--save", "{p}"], "--save .* exists and is not an empty folder"),
    (lambda p: None, ["--model", "hf:{p}"], "no config.json in"),
])
def test_save_and_hf_errors_exit_2_before_the_run(make, argv, message, tmp_path, capsys):
    make(tmp_path)
    code = cli.main([a.replace("{p}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_transformers_config_alone_runs_randomly_initialised(tmp_path, capsys):
    """--model hf:config.json (no weights): a randomly initialised GPT-2 from the config runs the whole flow (Conv1D
    weights fused; the head, tied to the embedding, left dense), exit 0; --export says to import
    transformers.modeling_outputs where it is loaded."""
    pytest.importorskip("transformers")
    from helpers import tiny_causal_lm

    tiny_causal_lm("gpt2").config.to_json_file(tmp_path / "config.json")
    code = cli.main(["--model", f"hf:{tmp_path / 'config.json'}", "--method", "magnitude", "--no-graph",
                     "--no-progress", "--input-shape", "2,16", "--export", str(tmp_path / "m.pt2")])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out[-2000:]
    assert "import transformers.modeling_outputs" in out and "GPT2LMHeadModel" in out
