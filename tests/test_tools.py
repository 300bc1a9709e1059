from tools import cli, stats


def test_stats_prints_budget(capsys):
    assert stats.main(["default"]) == 0
    line = capsys.readouterr().out.splitlines()[-1].split()
    assert line[0] == "default" and line[1] == "256"
    params, megabytes, gflops = int(line[2].replace(",", "")), float(line[3]), float(line[4])
    assert params * 2 / 1e6 == megabytes or abs(params * 2 / 1e6 - megabytes) < 0.01
    assert megabytes <= 20 and gflops <= 5
    assert stats.main([]) == 0  # no argument: every preset
    assert {l.split()[0] for l in capsys.readouterr().out.splitlines()[1:]} == {"default", "fast", "tiny"}


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main([]) == 2
    assert "encode" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
