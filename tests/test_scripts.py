"""scripts/ensure_chromium.sh, run for real with a PATH of stub commands.

No chromium is on that PATH; `id` says root; a fake `apt-cache` prints a long `policy` output (as
Debian's does: about 1 MB here, past the pipe buffer, so a reader that stops early kills it by
SIGPIPE); a fake `apt-get` records its calls and environment, prints a lot, and on `install` puts a
stub chromium on the PATH. The script must install, print what it installed, keep apt-get's output
out of sight unless it fails, and fail with a clear message when there is nothing to install.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ensure_chromium.sh"
BASH = shutil.which("bash")
TOOLS = ("grep", "env", "mktemp", "rm", "cat")  # what the script needs besides bash builtins
NOISE = "Get:1 http://deb.debian.org/debian bookworm/main amd64 noise"


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!{BASH}\n{body}")
    path.chmod(0o755)


def make_stubs(tmp_path: Path, candidate: str = "131.0.6778.139-1~deb12u1", uid: int = 0,
               install_fails: bool = False) -> Path:
    """A bin directory holding the stubs and links to the few real tools the script uses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    calls = tmp_path / "apt-get.calls"
    _stub(bin_dir / "id", f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"\n')
    _stub(bin_dir / "apt-cache", f"""\
echo "chromium:"
echo "  Installed: (none)"
echo "  Candidate: {candidate}"
echo "  Version table:"
for ((i = 0; i < 20000; i++)); do
  echo "     131.0.6778.$i-1~deb12u1 500 http://deb.debian.org/debian"
done
""")
    chromium = f'#!{BASH}\\necho "Chromium 131.0.6778.139 stub"\\n'
    _stub(bin_dir / "apt-get", f"""\
echo "$* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {calls}
for ((i = 0; i < 300; i++)); do echo "{NOISE} $i"; done
if [ "$1" = install ]; then
  {"echo 'E: Unable to fetch some archives' >&2; exit 100" if install_fails else ""}
  printf '{chromium}' > {bin_dir}/chromium
  {shutil.which('chmod')} +x {bin_dir}/chromium
fi
""")
    return bin_dir


def run_script(tmp_path: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.run([BASH, str(SCRIPT)], env={"PATH": str(bin_dir), "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=60)


def apt_calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "apt-get.calls"
    return calls.read_text().splitlines() if calls.is_file() else []


def test_installs_chromium_when_missing(tmp_path):
    bin_dir = make_stubs(tmp_path)
    r = run_script(tmp_path, bin_dir)
    assert r.returncode == 0, r.stderr
    assert apt_calls(tmp_path) == ["update DEBIAN_FRONTEND=noninteractive",
                                   "install -y chromium DEBIAN_FRONTEND=noninteractive"]
    assert f"chromium installed: {bin_dir / 'chromium'} (Chromium 131.0.6778.139 stub)" in r.stdout
    assert NOISE not in r.stdout + r.stderr           # apt-get's output stays in its log ...
    assert list((tmp_path / "tmp").iterdir()) == []   # ... which is removed afterwards


def test_no_candidate_fails_clearly(tmp_path):
    r = run_script(tmp_path, make_stubs(tmp_path, candidate="(none)"))
    assert r.returncode == 1
    assert "the package 'chromium' is not available from this system's apt sources" in r.stderr
    assert apt_calls(tmp_path) == ["update DEBIAN_FRONTEND=noninteractive"]  # nothing installed


def test_apt_get_failure_shows_its_output(tmp_path):
    r = run_script(tmp_path, make_stubs(tmp_path, install_fails=True))
    assert r.returncode == 1
    assert "error: 'apt-get install -y chromium' failed; its output:" in r.stderr
    assert "E: Unable to fetch some archives" in r.stderr and f"{NOISE} 299" in r.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_chromium_on_path_is_used_as_is(tmp_path):
    bin_dir = make_stubs(tmp_path)
    _stub(bin_dir / "chromium", 'echo "Chromium 1.2.3"\n')
    r = run_script(tmp_path, bin_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"chromium found: {bin_dir / 'chromium'} (Chromium 1.2.3)"
    assert apt_calls(tmp_path) == []


def test_not_root_without_sudo_fails_clearly(tmp_path):
    r = run_script(tmp_path, make_stubs(tmp_path, uid=1000))
    assert r.returncode == 1
    assert "installing chromium needs root (apt-get), and sudo is not available" in r.stderr
    assert apt_calls(tmp_path) == []

