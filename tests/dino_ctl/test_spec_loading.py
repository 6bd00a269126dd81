"""The one spec loader (``trainer.config.read_yaml_mapping`` under ``dino_ctl.validation.load_spec``): a test per
loading rule with its exact message, the alias bomb within 1 s and 100 MB, and every command that reads a spec
refusing the same file with exit 2."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from dino_ctl.errors import SpecErrors
from dino_ctl.validation import load_spec
from trainer.config import MAX_ALIAS_NODES, MAX_BYTES, ConfigError, load_config_file, parse_yaml_mapping
from tests.dino_ctl.spec_helpers import EXAMPLES, document

runner = CliRunner()
QUICKSTART = (EXAMPLES / "quickstart.yaml").read_text()


def _error(tmp_path: Path, data: bytes | str) -> str:
    """The one error message ``load_spec`` raises for a file holding ``data``."""
    path = tmp_path / "spec.yaml"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    with pytest.raises(SpecErrors) as info:
        load_spec(path)
    [error] = info.value.errors
    message = str(error)
    assert "\n" not in message and len(message) < 400
    return message.replace(str(path), "spec.yaml")


def _billion_laughs(levels: int = 9) -> str:
    """The classic: nine aliases of nine aliases of ... nine strings (9^9 = 387 million strings, 700 bytes)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_the_examples_load() -> None:
    assert load_spec(EXAMPLES / "quickstart.yaml").name == "quickstart"


def test_duplicate_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    text = QUICKSTART.replace("  seed: 0\n", "  seed: 0\n  seed: 1\n")
    assert _error(tmp_path, text) == (
        "spec.seed: invalid value 'seed' at lines 13 and 14; allowed: each key once per mapping (YAML would keep only "
        "the last one)"
    )


def test_duplicate_key_deep_inside_a_list(tmp_path: Path) -> None:
    text = QUICKSTART.replace("        optim.iterations: 3000\n",
                              "        optim.iterations: 3000\n        optim.iterations: 30\n")
    assert _error(tmp_path, text).startswith(
        "spec.stages[0].overrides.optim.iterations: invalid value 'optim.iterations' at lines 49 and 50;")


def test_non_utf8_bytes(tmp_path: Path) -> None:
    data = QUICKSTART.encode().replace(b"name: quickstart", b"name: quickst\xe4rt")
    assert _error(tmp_path, data) == (
        "spec.yaml: invalid value 'byte 0xe4' at line 9, column 16; allowed: UTF-8 text (save the file as UTF-8)"
    )


def test_utf16_is_named(tmp_path: Path) -> None:
    assert _error(tmp_path, QUICKSTART.encode("utf-16")) == (
        "spec.yaml: invalid value 'UTF-16 text'; allowed: UTF-8 text (save the file as UTF-8)"
    )


def test_a_utf8_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + QUICKSTART.encode())
    assert load_spec(path).name == "quickstart"


def test_binary_file(tmp_path: Path) -> None:
    assert _error(tmp_path, bytes(range(256)) * 4) == (
        "spec.yaml: invalid value 'binary data' (a NUL byte at offset 0); allowed: UTF-8 text"
    )


def test_control_characters(tmp_path: Path) -> None:
    assert _error(tmp_path, "a: \x07\n") == (
        "spec.yaml: invalid value 'character U+0007 (control characters are not allowed) at line 1, column 4'; "
        "allowed: valid YAML"
    )


def test_several_documents(tmp_path: Path) -> None:
    assert _error(tmp_path, QUICKSTART + "---\n" + QUICKSTART) == (
        "spec.yaml: invalid value 'a second YAML document' at line 53; allowed: one document (no second '---')"
    )
    # one document with its own '---' and '...' markers is one document
    path = tmp_path / "one.yaml"
    path.write_text("---\n" + QUICKSTART + "...\n")
    assert load_spec(path).name == "quickstart"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    message = _error(tmp_path, text)
    assert message in ("spec.yaml: invalid value 'an empty file'; allowed: one YAML mapping",
                       "spec.yaml: invalid value 'null'; allowed: one YAML mapping at the top")


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"), ("hello\n", "a string"), ("3\n", "an integer")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    assert _error(tmp_path, text) == f"spec.yaml: invalid value '{kind}'; allowed: one YAML mapping at the top"


def test_syntax_error_is_one_line_with_its_position(tmp_path: Path) -> None:
    assert _error(tmp_path, "spec: [unclosed\n") == (
        "spec.yaml: invalid value \"did not find expected ',' or ']' at line 2, column 1\"; allowed: valid YAML"
    )


def test_billion_laughs_is_refused_within_1s_and_100MB(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_billion_laughs())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(SpecErrors) as info:
            load_spec(path)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 100 * 2**20, (elapsed, peak)
    assert str(info.value.errors[0]) == (
        "a4[0]: invalid value '*a3' at line 5; allowed: aliases that repeat at most 10,000 nodes in all (this one "
        "brings the document to 15,670: a 'billion laughs' expansion)"
    )


def test_billion_laughs_inside_a_spec_in_another_process(tmp_path: Path) -> None:
    """As a user meets it: a bomb hidden in a stage's overrides; wall time and peak RSS growth of a fresh process."""
    import subprocess
    import sys

    overrides = "".join(f"        x.{line}\n" for line in _billion_laughs().splitlines())
    path = tmp_path / "bomb.yaml"
    path.write_text(QUICKSTART.replace("      overrides:\n", "      overrides:\n" + overrides))
    code = (
        "import resource, time\n"
        "from dino_ctl.errors import SpecErrors\n"
        "from dino_ctl.validation import load_spec\n"
        "base, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()\n"
        f"try:\n    load_spec({str(path)!r})\nexcept SpecErrors as exc:\n    print(exc.errors[0])\n"
        "print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    message, numbers = result.stdout.strip().splitlines()
    seconds, extra_kib = numbers.split()  # ru_maxrss is in KiB on Linux
    assert message.startswith("spec.stages[0].overrides.x.a4[0]: invalid value '*a3' at line 39; allowed: aliases")
    assert float(seconds) < 1.0 and int(extra_kib) < 100 * 1024, numbers


def test_aliases_within_the_bound_expand() -> None:
    loaded = parse_yaml_mapping("base: &b {x: 1, y: [1, 2]}\nm:\n  <<: *b\n  y: 3\ncopy: *b\n")
    assert loaded == {"base": {"x": 1, "y": [1, 2]}, "m": {"x": 1, "y": 3}, "copy": {"x": 1, "y": [1, 2]}}
    assert loaded["copy"] is not loaded["base"]  # expanded, not shared: consumers may edit what they got
    assert parse_yaml_mapping("a: &a [1, 2]\nb: [*a, *a]\n")["b"] == [[1, 2], [1, 2]]
    assert MAX_ALIAS_NODES == 10_000


def test_recursive_alias(tmp_path: Path) -> None:
    assert _error(tmp_path, "a: &r [1, *r]\n") == (
        "a[1]: invalid value '*r' at line 1; allowed: an alias outside the collection it names (no recursion)"
    )


def test_file_size_bound(tmp_path: Path) -> None:
    big = "a: '" + "x" * MAX_BYTES + "'\n"
    assert _error(tmp_path, big) == (
        "spec.yaml: invalid value 'more than 262,144 bytes'; allowed: at most 262,144 bytes (256 KiB)"
    )


def test_nesting_depth_bound(tmp_path: Path) -> None:
    assert _error(tmp_path, "a: " + "[" * 100 + "]" * 100 + "\n").startswith(
        "a" + "[0]" * 63 + ": invalid value '65 levels' at line 1; allowed: at most 64 levels of nesting")
    # deeper than libyaml's own limit (1,000): still one line, no RecursionError
    assert "maximum nesting depth" in _error(tmp_path, "[" * 100_000)


@pytest.mark.parametrize(("value", "message"), [
    ("!!binary aGVsbG8=", "spec.seed: invalid value '!!binary' at line 13; allowed: plain YAML"),
    ("!!python/object/apply:os.system [ls]",
     "spec.seed: invalid value '!!python/object/apply:os.system' at line 13; allowed: plain YAML"),
    ("!!set {a, b}", "spec.seed: invalid value '!!set' at line 13; allowed: plain YAML"),
    (".nan", "spec.seed: invalid value '.nan' at line 13; allowed: a finite number (JSON and the Kubernetes API have "
             "no NaN or infinity)"),
    ("-.inf", "spec.seed: invalid value '-.inf' at line 13; allowed: a finite number"),
    ("9" * 5000, "spec.seed: invalid value '9999999999999999999999999999999999999999' at line 13; allowed: an integer "
                 "that fits 64 bits"),
    ("9223372036854775808", "spec.seed: invalid value '9223372036854775808' at line 13; allowed: an integer that fits "
                            "64 bits (-2^63 .. 2^63-1)"),
    ("!!bool maybe", "spec.seed: invalid value 'maybe' at line 13; allowed: a bool written as YAML writes one"),
])
def test_only_json_values(tmp_path: Path, value: str, message: str) -> None:
    assert _error(tmp_path, QUICKSTART.replace("  seed: 0", f"  seed: {value}")).startswith(message)


def test_keys_are_strings(tmp_path: Path) -> None:
    assert _error(tmp_path, QUICKSTART.replace("  seed: 0", "  seed: 0\n  on: 1")) == (
        "spec.<key>: invalid value True at line 14; allowed: a string key (quote it: yes/no/on/off are booleans in "
        "YAML 1.1)"
    )


def test_unquoted_dates_stay_strings() -> None:
    assert parse_yaml_mapping("d: 2024-01-01\nt: 2024-01-01T10:00:00Z\n") == {"d": "2024-01-01",
                                                                             "t": "2024-01-01T10:00:00Z"}


def test_missing_directory_and_fifo_paths_do_not_block(tmp_path: Path) -> None:
    assert _error_for(tmp_path / "nope.yaml").endswith("allowed: a path to an existing file")
    assert _error_for(tmp_path).endswith("invalid value 'a directory'; allowed: a path to a regular file")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    assert _error_for(fifo).endswith("invalid value 'not a regular file'; allowed: a path to a regular file")


def _error_for(path: Path) -> str:
    with pytest.raises(SpecErrors) as info:
        load_spec(path)
    return str(info.value.errors[0])


def test_the_trainer_config_file_uses_the_same_loader(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("optim:\n  iterations: 5\n  iterations: 6\n")
    with pytest.raises(ConfigError, match=r"optim.iterations: invalid value 'iterations' at lines 2 and 3"):
        load_config_file(str(path), [])
    path.write_text("")
    assert load_config_file(str(path), []).recipe == "tiny"  # an empty config file is the recipe's defaults


def _duplicate_key_spec(tmp_path: Path) -> Path:
    doc = yaml.safe_dump(document(), sort_keys=False)
    path = tmp_path / "dup.yaml"
    path.write_text(doc.replace("  image: ", "  backend: pytorchjob\n  backend: torchx\n  image: ", 1))
    return path


@pytest.mark.parametrize("command", [
    ["validate"], ["render"], ["submit", "--dry-run"], ["run"], ["checkpoints", "list", "--spec"],
])
def test_every_command_reading_a_spec_refuses_it_with_exit_2(tmp_path: Path, command: list[str]) -> None:
    path = _duplicate_key_spec(tmp_path)
    result = runner.invoke(app, [*command, str(path)])
    assert result.exit_code == 2, result.output
    message = "spec.backend: invalid value 'backend' at lines 7 and 8; allowed: each key once per mapping"
    assert message in " ".join(result.output.split())


def test_curate_uses_the_same_loader(tmp_path: Path) -> None:
    path = tmp_path / "curation.yaml"
    text = (EXAMPLES / "curation.yaml").read_text()
    path.write_text(text + text.splitlines()[[i for i, line in enumerate(text.splitlines())
                                              if line.startswith("name:")][0]] + "\n")
    result = runner.invoke(app, ["curate", str(path), "--render", "--image", "x"])
    assert result.exit_code == 2, result.output
    assert "name: invalid value 'name' at lines" in " ".join(result.output.split())


def test_json_exponent_numbers_are_floats() -> None:
    """Found by test_spec_properties: YAML 1.1 reads JSON's ``1e-05`` (no dot) as a string, so a spec written as
    JSON (``kubectl get -o json``) lost its numbers; YAML 1.2 and Kubernetes read a float."""
    assert parse_yaml_mapping('{"lr": 1e-05, "tiny": 5e-324, "big": 1E+3, "text": "1e5"}') == {
        "lr": 1e-05, "tiny": 5e-324, "big": 1000.0, "text": "1e5"}
    with pytest.raises(ConfigError, match=r"lr: invalid value '1e400' at line 1; allowed: a finite number"):
        parse_yaml_mapping("lr: 1e400")


def test_the_worst_file_within_the_bound_loads_quickly() -> None:
    """The most nodes a file within MAX_BYTES can hold (one-character list items): under a second on an idle core;
    the bound here leaves room for a loaded machine."""
    text = "a: [" + "1," * (MAX_BYTES // 2 - 4) + "1]\n"
    assert len(text) <= MAX_BYTES
    started = time.perf_counter()
    assert len(parse_yaml_mapping(text)["a"]) == MAX_BYTES // 2 - 3
    assert time.perf_counter() - started < 5.0
