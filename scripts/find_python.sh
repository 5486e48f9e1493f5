#!/bin/sh
# Print the path of a Python >= 3.12 interpreter (lerobot 0.6 needs it), or explain and fail.
# Order: $PYTHON if set, then pythonX.Y / python3 on PATH, then interpreters installed by
# pyenv or uv that are not on PATH. 3.12 comes first: it is what lerobot is tested with.
ok() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}
if [ -n "${PYTHON:-}" ]; then
    if ok "$PYTHON"; then echo "$PYTHON"; exit 0; fi
    echo "error: PYTHON=$PYTHON is not a working Python >= 3.12 with venv." >&2
    exit 1
fi
for name in python3.12 python3.13 python3.14 python3; do
    path=$(command -v "$name" 2>/dev/null) && ok "$path" && { echo "$path"; exit 0; }
done
pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for path in "$pyenv_root"/versions/3.12*/bin/python3 "$pyenv_root"/versions/3.1[3-9]*/bin/python3 \
            "$HOME"/.local/share/uv/python/cpython-3.1[2-9]*/bin/python3; do
    [ -x "$path" ] && ok "$path" && { echo "$path"; exit 0; }
done
cat >&2 <<'MSG'
error: chunkbus needs Python >= 3.12 (lerobot 0.6 requires it), and none was found
on PATH, in pyenv or in uv. Install one, for example:
    pyenv install 3.12        or    uv python install 3.12
    sudo apt install python3.12-venv  (Debian/Ubuntu)
or point to one with:  make test PYTHON=/path/to/python3.12
MSG
exit 1
