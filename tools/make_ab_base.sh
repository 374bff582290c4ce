#!/usr/bin/env bash
# Makes the base tree of an A/B: the sources of a commit, unpacked into
# <folder>/tree in the checkout (default .ab_base), beside AB_COMMIT (the
# commit's line) and a .gitignore of '*' that keeps the folder out of git
# (not inside the tree: the build reads the tree's own .gitignore, and a '*'
# there would leave the Python files out of the wheel). Name the folder in
# the device call's `carry`, with AB=<folder> for tools/gpu_session.sh.
#   bash tools/make_ab_base.sh <commit> [folder]
set -euo pipefail
rev=${1:?usage: make_ab_base.sh <commit> [folder]}
dir=${2:-.ab_base}
cd "$(git rev-parse --show-toplevel)"
sha=$(git rev-parse --verify "$rev^{commit}")
rm -rf "$dir"
mkdir -p "$dir/tree"
git archive "$sha" | tar -x -C "$dir/tree"
git log -1 --format='%h %s' "$sha" | cut -c1-100 > "$dir/AB_COMMIT"
echo '*' > "$dir/.gitignore"
echo "$dir: $(cat "$dir/AB_COMMIT"), $(du -sh "$dir" | cut -f1);" \
  "library sources sha1 $(bash tools/gpu_session.sh --sha1 "$dir/tree")"
