#!/usr/bin/env bash
# The service runs as the unprivileged compute user (postgres), which cannot run an interpreter kept under a
# private home (a pyenv in /root). As root, make it one it can run: a venv of Debian's python3 holding
# tierbase's dependencies (the service gets tierbase itself from the checkout that starts it), kept in step
# with pyproject.toml on every run. Use it with TIERBASE_PYTHON=$venv/bin/python (the tests find it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || exit 0  # not root: the service runs as you, on this interpreter
user="${TIERBASE_COMPUTE_USER:-postgres}"
venv="${TIERBASE_SERVICE_VENV:-/opt/tierbase/venv}"
id "$user" >/dev/null 2>&1 || exit 0  # no compute user yet: `tierbase up` will say what to do
as_user() { setpriv --reuid="$user" --regid="$user" --clear-groups env PYTHONPATH="$PWD" "$@"; }
probe='import tierbase.service'  # everything the service imports
exe="$(${PYTHON:-python3} -c 'import sys; print(sys.executable)')"
if as_user "$exe" -c "$probe" 2>/dev/null; then exit 0; fi
[ -x "$venv/bin/python" ] || { echo "making $venv: $exe cannot be run by the service user $user"; /usr/bin/python3 -m venv "$venv"; }
/usr/bin/python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
  > "$venv/requirements.txt"
"$venv/bin/pip" install -q -r "$venv/requirements.txt"
if ! as_user "$venv/bin/python" -c 'import tierbase' 2>/dev/null || [ -d "$venv/lib/tierbase-copy" ]; then
  # this checkout is out of the service user's reach too (a clone under /root): give the venv a copy of
  # tierbase; a reachable checkout still comes first on the service's PYTHONPATH (tierbase/launch.py)
  tmp="$(mktemp -d)"; cp -r pyproject.toml README.md tierbase "$tmp/"
  "$venv/bin/pip" install -q --no-deps "$tmp"; rm -rf "$tmp"; mkdir -p "$venv/lib/tierbase-copy"
fi
chmod -R go+rX "$venv"
as_user "$venv/bin/python" -c "$probe"
