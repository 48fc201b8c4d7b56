#!/usr/bin/env bash
# Builds the Debian package and prints its path.
#
#   bash scripts/package.sh                  release build, then target/debian/switchyard_<version>_<arch>.deb
#   bash scripts/package.sh --output DIR     write the .deb into DIR instead
#   bash scripts/package.sh --binary PATH    package this binary instead of building one
#   bash scripts/package.sh --fast           quicker compression, larger package
#
# Needs cargo-deb (`cargo install --locked cargo-deb --version 3.8.0`).
# Steps: `cargo build --release` (fat LTO: several minutes on two cores),
# then the man page and shell completions, which the built binary generates
# from its own CLI definition (`switchyard man`, `switchyard completions
# SHELL`), and the gzipped docs, into target/release/package-assets/; then
# `cargo deb --no-build`, which packs them with the rest of
# `[package.metadata.deb]` in Cargo.toml.
#
# With --binary, the binary and the generated files are staged in
# target/package-staging/release/ and cargo-deb is pointed there
# (CARGO_TARGET_DIR), so nothing is built and the release build's own
# files are left alone. tests/package.rs packages the binary `cargo test`
# built this way, with --fast.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# Relative --binary and --output paths are the caller's.
caller=$PWD
absolute() {
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s' "$caller/$1" ;;
  esac
}

binary=
output=
fast=no

usage() {
  sed -n '4,7p' "$0" | sed 's/^# \{0,1\}//'
}

while (($#)); do
  case $1 in
    --binary)
      [[ $# -ge 2 ]] || { echo "package.sh: --binary needs a path" >&2; exit 1; }
      binary=$(absolute "$2")
      shift 2
      ;;
    --fast)
      fast=yes
      shift
      ;;
    --output)
      [[ $# -ge 2 ]] || { echo "package.sh: --output needs a path" >&2; exit 1; }
      output=$(absolute "$2")
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "package.sh: unknown argument: $1" >&2
      usage >&2
      exit 1
      ;;
  esac
done

cd "$repo"
command -v cargo-deb >/dev/null 2>&1 || {
  echo "package.sh: cargo-deb is not installed: cargo install --locked cargo-deb --version 3.8.0" >&2
  exit 1
}

# CARGO_TARGET_DIR or a cargo config file may move the target directory,
# so ask cargo where it is.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $target_dir ]] || { echo "package.sh: cannot find cargo's target directory" >&2; exit 1; }

if [[ -n $binary ]]; then
  [[ -f $binary && -x $binary ]] || { echo "package.sh: no executable at $binary" >&2; exit 1; }
  # cargo-deb takes the binary from <target dir>/release/ (Cargo.toml's
  # `target/release/` assets).
  root=$target_dir/package-staging
  rm -rf "$root"
  mkdir -p "$root/release"
  cp "$binary" "$root/release/switchyard"
  export CARGO_TARGET_DIR=$root
else
  root=$target_dir
  cargo build --locked --release --bin switchyard
fi
binary=$root/release/switchyard

# Generated assets, named as Cargo.toml's assets expect them. Each is
# written beside its final name and renamed, so a failed generator leaves
# no empty file to be packed.
assets=$root/release/package-assets
rm -rf "$assets"
mkdir -p "$assets/doc"
generate() {
  local dest=$1
  shift
  "$@" >"$dest.tmp"
  [[ -s $dest.tmp ]] || { echo "package.sh: '$*' printed nothing" >&2; exit 1; }
  mv "$dest.tmp" "$dest"
}
# Debian policy: man pages are gzipped with the best compression, and so is
# documentation over 4 kB (-n: no name or timestamp inside, so the same
# input gives the same bytes).
# switchyard.1 and one page per subcommand (switchyard-run.1, ...), which
# the main page's SUBCOMMANDS section refers to.
mkdir -p "$assets/man"
"$binary" man --dir "$assets/man"
[[ -s $assets/man/switchyard.1 ]] || { echo "package.sh: 'switchyard man --dir' wrote no switchyard.1" >&2; exit 1; }
for page in "$assets"/man/*.1; do
  generate "$page.gz" gzip -9nc "$page"
  rm "$page"
done
generate "$assets/switchyard.bash" "$binary" completions bash
generate "$assets/_switchyard" "$binary" completions zsh
generate "$assets/switchyard.fish" "$binary" completions fish
for doc in README.md docs/*.md; do
  generate "$assets/doc/$(basename "$doc").gz" gzip -9nc "$doc"
done

args=(--no-build)
[[ -n $output ]] && args+=(--output "$output")
[[ $fast == yes ]] && args+=(--fast)
# cargo-deb prints the path of the package it wrote as its last line.
deb=$(cargo deb "${args[@]}" | tail -n 1)
[[ -f $deb ]] || { echo "package.sh: cargo deb did not report a package (got '$deb')" >&2; exit 1; }
echo "$deb"
