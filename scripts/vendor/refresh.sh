#!/bin/sh
# Refresh the page's vendored libraries from the npm registry: the versions pinned in
# scripts/vendor/package.json (and its lock file), their browser builds copied into static/vendor
# with their licences, and static/vendor/LIBRARIES.md rewritten with each file's sha256.
# To upgrade one: change its version in package.json, run `npm install --prefix scripts/vendor`, then this.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../static/vendor"
npm ci --prefix "$here" --no-audit --no-fund >/dev/null
modules="$here/node_modules"

# package  file in the package  name in static/vendor
set -- \
  htm "preact/standalone.module.js" preact-htm.module.js \
  marked "lib/marked.esm.js" marked.esm.js \
  dompurify "dist/purify.es.mjs" purify.es.js \
  uplot "dist/uPlot.esm.js" uPlot.esm.js \
  uplot "dist/uPlot.min.css" uPlot.min.css

{
  echo "# Libraries copied from npm by scripts/vendor/refresh.sh (do not edit by hand)"
  echo
  echo "| file | package | version | licence | sha256 |"
  echo "|---|---|---|---|---|"
} > "$out/LIBRARIES.md"
while [ $# -gt 0 ]; do
  package=$1 source=$2 target=$3
  shift 3
  cp "$modules/$package/$source" "$out/$target"
  cp "$modules/$package/LICENSE" "$out/$package.LICENSE"
  version=$(node -p "require('$modules/$package/package.json').version")
  licence=$(node -p "require('$modules/$package/package.json').license")
  sum=$(sha256sum "$out/$target" | cut -d' ' -f1)
  echo "| \`$target\` | $package | $version | $licence | \`$sum\` |" >> "$out/LIBRARIES.md"
done
echo "refreshed: $(ls "$out")"
