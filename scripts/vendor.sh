#!/usr/bin/env bash
# Refresh the web UI's vendored browser files from npm: `make vendor`.
#
# uPlot (the charts, MIT) is committed under src/pgfleet/web/static/vendor/uplot/ so
# that a checkout, an sdist and a wheel all have charts without npm.  npm is
# only how it gets updated, at the version package-lock.json pins:
#
#   npm install --save-exact --no-audit --no-fund uplot@1.6.33   # package*.json
#   make vendor                                                  # the copied files
#   git add package.json package-lock.json src/pgfleet/web/static/vendor
#
# tests/test_packaging.py checks that the vendored files say the locked version.

set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v npm >/dev/null; then
    echo "vendor: npm not found (apt-get install npm)" >&2
    exit 1
fi

# npm ci installs exactly what package-lock.json says (and fails if package.json
# disagrees with it), into node_modules (git-ignored).
npm ci --no-audit --no-fund --loglevel=error >/dev/null

version=$(node -p 'require("./node_modules/uplot/package.json").version')
dest=src/pgfleet/web/static/vendor/uplot
rm -rf "$dest"
mkdir -p "$dest"
cp node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css \
    node_modules/uplot/LICENSE "$dest/"

# The minified script's banner names its version: the test reads it there.
if ! head -c 200 "$dest/uPlot.iife.min.js" | grep -qF "(v$version)"; then
    echo "vendor: $dest/uPlot.iife.min.js does not say v$version in its banner" >&2
    exit 1
fi
echo "vendor: uPlot $version in $dest"
git status --short -- "$dest" package.json package-lock.json
