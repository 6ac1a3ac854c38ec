"""Every refused setting, in this process, the way twistd meets it: the plugin's
options parsed as twistd's subcommand, the .tac loaded as C{twistd -y} loads it. Each
ends in one line on stderr, naming the setting (and the bound it passed), and in
C{CONFIG_ERROR_EXIT}, the status the process ends with. test_twistd.py runs a sample
of the same in real twistd processes: that the line reaches stderr alone, the status
the shell, with no traceback."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
from twisted.persisted.sob import loadValueFromFile
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from badconfig import BAD_ENVIRONMENT, BAD_OPTIONS, full_environment, full_options, why
from conftest import REPO
from emojistream.config import CONFIG_ERROR_EXIT, SPECS, ConfigExit

PLUGIN = REPO / "twisted" / "plugins" / "emojistream_plugin.py"
TAC = REPO / "emojistream.tac"


def plugin_options() -> usage.Options:
    """The options of the plugin twistd finds in twisted/plugins, made as twistd
    makes a subcommand's: by its ServiceMaker, with twistd's own options as parent."""
    spec = importlib.util.spec_from_file_location("emojistream_plugin_under_test", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.emojistream.tapname == "emojistream"
    options: usage.Options = module.emojistream.options()
    options.parent = ServerOptions()
    return options


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], None]:
    """Set the process environment to none of the daemon's variables but these."""
    for spec in SPECS:
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)

    def set_only(env: dict[str, str]) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return set_only


def assert_one_line_exit(exit: pytest.ExceptionInfo[ConfigExit],
                         captured: pytest.CaptureResult[str], start: str,
                         says: str = "") -> None:
    """The process would end with CONFIG_ERROR_EXIT, having said on stderr one line
    that starts with C{start} (who, and the setting) and says C{says}; nothing else."""
    line = str(exit.value)
    assert exit.value.code == CONFIG_ERROR_EXIT
    assert captured.out == ""
    assert captured.err == f"{line}\n"
    assert "\n" not in line
    assert line.startswith(start), line
    assert says in line, line
    # Found as twistd finds them: reuseport: is this checkout's plugin.
    assert "Unknown endpoint type" not in line or "'bogus" in line, line


@pytest.mark.parametrize(("args", "names"), BAD_OPTIONS)
def test_a_bad_option_is_one_line_and_the_config_error_status(
        args: list[str], names: str, environ: Callable[[dict[str, str]], None],
        capsys: pytest.CaptureFixture[str]) -> None:
    environ({})
    options = plugin_options()
    with pytest.raises(ConfigExit) as exit:
        options.parseOptions(full_options(args))
    assert_one_line_exit(exit, capsys.readouterr(), f"twistd emojistream: {names}",
                         why(args[0], args[1]))


@pytest.mark.parametrize(("name", "value"), BAD_ENVIRONMENT)
def test_a_bad_environment_value_is_one_line_and_the_config_error_status_for_the_plugin(
        name: str, value: str, environ: Callable[[dict[str, str]], None],
        capsys: pytest.CaptureFixture[str]) -> None:
    environ(full_environment(name, value))
    options = plugin_options()
    with pytest.raises(ConfigExit) as exit:
        options.parseOptions([])
    assert_one_line_exit(exit, capsys.readouterr(), f"twistd emojistream: {name}: ",
                         why(name, value))


@pytest.mark.parametrize(("name", "value"), BAD_ENVIRONMENT)
def test_a_bad_environment_value_is_one_line_and_the_config_error_status_for_the_tac(
        name: str, value: str, environ: Callable[[dict[str, str]], None],
        capsys: pytest.CaptureFixture[str]) -> None:
    environ(full_environment(name, value))
    with pytest.raises(ConfigExit) as exit:
        loadValueFromFile(str(TAC), "application")
    assert_one_line_exit(exit, capsys.readouterr(), f"emojistream.tac: {name}: ",
                         why(name, value))


def test_the_tac_refuses_workers_in_one_line(
        environ: Callable[[dict[str, str]], None],
        capsys: pytest.CaptureFixture[str]) -> None:
    """A .tac is one process: WORKERS=3 was silently ignored (one process served)."""
    environ({"WORKERS": "3", "PORT": "0"})
    with pytest.raises(ConfigExit) as exit:
        loadValueFromFile(str(TAC), "application")
    assert_one_line_exit(exit, capsys.readouterr(),
                         "emojistream.tac: WORKERS: the .tac runs one process")


@pytest.mark.parametrize("listen", ["tcp:8001", "tcp:8001:interface=127.0.0.1",
                                    "reuseport:8001", "unix:/tmp/emojistream-test.sock"])
def test_every_endpoint_resolves_without_a_socket(
        listen: str, environ: Callable[[dict[str, str]], None]) -> None:
    """Configuration only parses: here (the fast tier) binding or connecting a socket
    fails the test, so settings that resolve were resolved without trying the port,
    whether it is free or held (test_config.py holds real ones in the slow tier)."""
    environ({"PORT": "8001"})
    options = plugin_options()
    options.parseOptions(["--listen", listen, "--admin-listen", "tcp:8001", "--workers",
                          "2" if not listen.startswith("unix:") else "1"])
    settings = options.settings
    assert settings is not None
    assert (settings.listen, settings.admin_listen) == (listen, "tcp:8001")
