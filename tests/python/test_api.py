"""The Python surface: wrapper defaults equal the operator schemas' defaults (which
register_ops.cpp documents as the C++ option structs' defaults), the names, the import guard."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

import sapo_torch as st

WRAPPED = {
    "segment_steps": st.segment_steps,
    "step_rewards": st.step_rewards,
    "group_advantages": st.group_advantages,
    "outcome_advantages": st.outcome_advantages,
    "mix_advantages": st.mix_advantages,
    "policy_loss": st.policy_loss,
}


def _schema_defaults(op_name):
    schema = getattr(torch.ops.sapo, op_name).default._schema
    return {a.name: a.default_value for a in schema.arguments if a.default_value is not None or a.kwarg_only}


def _same(py, schema):
    if isinstance(py, (tuple, list)) or isinstance(schema, (tuple, list)):
        return list(py) == list(schema)
    if py is None:
        return schema is None
    return py == schema and type(py) in (type(schema), int, float, bool)


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_wrapper_defaults_match_the_operator_schema(name):
    params = inspect.signature(WRAPPED[name]).parameters
    schema = _schema_defaults(name)
    checked = 0
    for arg, default in schema.items():
        if arg in params and params[arg].default is not inspect.Parameter.empty:
            assert _same(params[arg].default, default), f"{name}({arg}): python {params[arg].default!r}, op {default!r}"
            checked += 1
    assert checked >= 2, f"{name}: compared only {checked} defaults"


def test_policy_loss_sends_only_non_default_options_and_the_table_matches_the_schema():
    # policy_loss drops options equal to _LOSS_DEFAULTS before calling the op, which is only
    # correct if that table is exactly the schema's defaults.
    schema = _schema_defaults("policy_loss")
    table = dict(st._LOSS_DEFAULTS)
    assert set(table) == {k for k in schema if k not in ("token_advantages", "step_advantages", "step", "ref_logp")}
    for k, v in table.items():
        assert _same(v, schema[k]), (k, v, schema[k])
    sig = inspect.signature(st.policy_loss).parameters
    for k, v in table.items():
        assert sig[k].default == v


def test_names_come_from_the_library():
    assert st.LOSS_DIAGNOSTIC_NAMES == tuple(torch.ops.sapo.loss_diagnostic_names())
    assert st.LOSS_DIAGNOSTIC_NAMES[:4] == ("loss", "clip_frac_low", "clip_frac_high", "clip_frac_dual")
    assert len(st.LOSS_DIAGNOSTIC_NAMES) == 13
    assert st.ADVANTAGE_STAT_NAMES == ("mean_reward", "zero_variance_fraction", "advantage_std", "n_present",
                                       "n_zero_variance", "n_pairs")


def test_docstrings_everywhere():
    for name in st.__all__:
        obj = getattr(st, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 20, name


def test_non_autograd_ops_do_not_record_a_graph():
    r = torch.rand(4, 3, requires_grad=True)
    out = st.group_advantages(r, group_size=2)
    assert not out.adv.requires_grad


def test_import_reuses_ops_registered_before_it(tmp_path):
    """SAPO_TORCH_LIBRARY names another shared object with the same TORCH_LIBRARY(sapo)
    registration (here: a copy of _C under another name, as libsapo_torch.so would be). The
    package loads it and must then not import its own _C: a second registration of the
    namespace aborts the process, so without the guard this subprocess dies."""
    import importlib.util
    import shutil

    copy = tmp_path / "libsapo_copy.so"
    shutil.copy(importlib.util.find_spec("sapo_torch._C").origin, copy)
    code = (
        "import sys, torch\n"
        "import sapo_torch\n"
        "assert 'sapo_torch._C' not in sys.modules, 'the bundled _C was imported as well'\n"
        "print(sapo_torch.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)).loss.item())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), SAPO_TORCH_LIBRARY=str(copy))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip()) == -1.0  # ratio 1, advantage 1: loss = -1
