"""export names the missing package and the ``[export]`` extra in one line (exit 2) instead of a
traceback, before it opens the checkpoint."""
import importlib.util

from altub_fast import export


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))


def test_missing_onnxscript_is_one_line_naming_the_extra(monkeypatch, capsys):
    _hide(monkeypatch, "onnxscript")
    status = export.main(["--checkpoint", "does-not-matter.pt", "--format", "onnx"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert "onnxscript" in err and 'altub_fast[export]' in err


def test_openvino_needs_openvino_and_the_onnx_exporter(monkeypatch):
    _hide(monkeypatch, "openvino", "onnxscript")
    msg = export.missing_packages(["openvino"])
    assert "openvino" in msg and "onnxscript" in msg
    assert export.missing_packages(["torchscript"]) is None


def test_nothing_missing_when_installed():
    assert export.missing_packages(["onnx", "openvino", "torchscript"]) is None
