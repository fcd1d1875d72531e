"""altub_fast.backend: the one place that decides triton / torch / the CPU fast path."""
import pytest
import torch
import torch.nn as nn

from altub_fast import backend, functional


@pytest.fixture
def user_cpu(monkeypatch):
    """A user on a CPU machine: no Triton interpreter, the default switch."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ALTUB_FAST_IMPL", raising=False)


def test_choose_cpu_fast_on_the_cpu_under_auto(user_cpu, monkeypatch):
    x = torch.zeros(2, 4)
    assert backend.choose(x) == "cpu_fast"
    assert backend.choose(x, x, impl="auto") == "cpu_fast"
    assert backend.choose(x, impl=" AUTO ") == "cpu_fast"
    monkeypatch.setenv("ALTUB_FAST_IMPL", "torch")
    assert backend.choose(x) == "torch"
    assert backend.choose(x, impl="auto") == "cpu_fast"  # a per-call choice overrides the environment


def test_cpu_fast_applies_is_choose_without_refusing(user_cpu, monkeypatch):
    x = torch.zeros(1, 3, 4, 4)
    assert backend.cpu_fast_applies(x) and backend.cpu_fast_applies(x, impl=" AUTO ")
    assert not backend.cpu_fast_applies(x, impl="torch")
    assert not backend.cpu_fast_applies(x, impl="triton")  # choose would refuse it; this only says no
    assert not backend.cpu_fast_applies(x, torch.zeros(1, device="meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not backend.cpu_fast_applies(x)
    with pytest.raises(ValueError, match="impl must be one of.*'fast'"):
        backend.cpu_fast_applies(x, impl="fast")


def test_choose_torch(user_cpu, monkeypatch):
    x = torch.zeros(2, 4)
    assert backend.choose(x, impl="torch") == "torch"
    # the interpreter is a correctness tool: under it "auto" is never the CPU fast path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose(x, torch.zeros(2, dtype=torch.float64), impl="auto") == "torch"
    assert backend.choose(x, impl="torch") == "torch"


def test_choose_triton_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 4)
    assert backend.choose(x, impl="auto") == "triton"
    assert backend.choose(x, impl="triton") == "triton"
    assert backend.resolve_impl("auto", x) == "triton"


def test_choose_not_cpu_fast_while_tracing(user_cpu):
    seen = []

    def f(x):
        seen.append(backend.choose(x))
        return x + 1

    torch.jit.trace(f, torch.zeros(2), check_trace=False)
    assert seen == ["torch"]


def test_triton_refused_with_the_reason(user_cpu):
    x = torch.zeros(2, 4)
    reason = backend.unavailable_reason(x)
    assert "TRITON_INTERPRET=1 is not set" in reason
    with pytest.raises(RuntimeError, match=r"impl='triton' was asked for but cannot run: the tensors are on the CPU"):
        backend.choose(x, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
        backend.resolve_impl("triton", x)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, 4)
    assert "not torch.float64" in backend.unavailable_reason(x, x.double())
    assert "bfloat16" in backend.unavailable_reason(x, x.bfloat16())
    assert "not on meta" in backend.unavailable_reason(torch.zeros(2, device="meta"))
    assert "different devices" in backend.unavailable_reason(x, torch.zeros(2, device="meta"))


def test_bad_switch_values_are_named(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of.*'fast'"):
        backend.choose(torch.zeros(1), impl="fast")
    monkeypatch.setenv("ALTUB_FAST_IMPL", "cuda")
    with pytest.raises(ValueError, match="ALTUB_FAST_IMPL must be one of"):
        backend.choose(torch.zeros(1))
    with pytest.raises(ValueError, match="at least one tensor"):
        backend.choose(impl="torch")


def test_functional_names_are_the_backend(monkeypatch):
    assert functional.resolve_impl is backend.resolve_impl
    assert functional.triton_unavailable_reason is backend.unavailable_reason
    assert functional.default_impl is backend.default_impl
    assert functional.IMPLS == backend.IMPLS == ("auto", "triton", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.interpreter()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.interpreter()


def test_check_kernel_tensors_errors():
    x = torch.zeros(2, 4)
    named = [("x", x), ("a", x)]
    with pytest.raises(TypeError, match="the coupling kernels take .*; a is torch.float64"):
        backend.check_kernel_tensors(named, [("x", x), ("a", x.double())], lambda: True, "coupling")
    with pytest.raises(ValueError, match="all tensors must be on one device, got x: cpu, m: meta"):
        backend.check_kernel_tensors(named[:1] + [("m", torch.zeros(2, device="meta"))], named[:1],
                                     lambda: True, "coupling")
    with pytest.raises(RuntimeError, match="not built for Triton's interpreter: set TRITON_INTERPRET=1"):
        backend.check_kernel_tensors(named, named, lambda: False, "coupling")
    with pytest.raises(TypeError, match="bfloat16"):
        backend.check_kernel_tensors(named, [("x", x.bfloat16())], lambda: True, "coupling")
    m = torch.zeros(2, device="meta")
    with pytest.raises(RuntimeError, match="run on CUDA .*not on meta"):
        backend.check_kernel_tensors([("x", m)], [("x", m)], lambda: True, "coupling")
    backend.check_kernel_tensors(named, named, lambda: True, "coupling")  # all fine: no error


class _WithImpl(nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.impl = impl
        self.lin = nn.Linear(2, 2)


def test_use_plain_path_sets_every_impl():
    model = nn.Sequential(_WithImpl("triton"), nn.Sequential(_WithImpl(None), nn.ReLU()), _WithImpl("auto"))
    model.impl = "auto"
    assert backend.use_plain_path(model) is model
    impls = [m.impl for m in model.modules() if hasattr(m, "impl")]
    assert impls == ["torch"] * 4
    assert not any(hasattr(m, "impl") for m in model.modules() if isinstance(m, (nn.Linear, nn.ReLU)))


def test_use_plain_path_on_a_flow():
    import altub_fast
    from _helpers import make_subnet
    flow = altub_fast.SequenceINN(4, 3, 3)
    for _ in range(2):
        flow.append(altub_fast.AllInOneBlock, subnet_constructor=make_subnet(2), impl="triton")
    backend.use_plain_path(flow)
    assert [b.impl for b in flow] == ["torch", "torch"]
    x = torch.randn(2, 4, 3, 3)
    z, ld = flow(x)  # runs on the reference: no Triton needed
    assert z.shape == x.shape and ld.shape == (2,)
