#!/usr/bin/env bash
# Runs the client compatibility matrix and copies its table (target/client-matrix.md, up to
# the details marker) into README.md between the client-matrix markers. The README is
# updated even when a cell failed, so the table always shows the last real run; the exit
# status is the test's.
set -uo pipefail

cd "$(dirname "$0")/../.."
bash tests/clients/setup.sh || echo "update_readme: setup.sh failed; missing drivers will show as skipped" >&2
rm -f target/client-matrix.md
cargo nextest run --test client_matrix --no-fail-fast --success-output final
status=$?
if [ ! -s target/client-matrix.md ]; then
    echo "update_readme: the test wrote no target/client-matrix.md" >&2
    exit 1
fi
python3 - <<'EOF'
import pathlib
import re

readme = pathlib.Path("README.md")
text = readme.read_text()
table = pathlib.Path("target/client-matrix.md").read_text().split("<!-- details -->")[0].strip()
begin, end = "<!-- client-matrix:begin -->", "<!-- client-matrix:end -->"
if begin not in text or end not in text:
    raise SystemExit("README.md lacks the client-matrix markers")
pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
readme.write_text(pattern.sub(lambda _: f"{begin}\n{table}\n{end}", text, count=1))
print("README.md: client matrix updated")
EOF
exit "${status}"
