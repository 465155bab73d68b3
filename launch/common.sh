# Shared by the launch scripts: dry-run aware command runner and argument helpers.
# shellcheck shell=bash
DRY_RUN=0

run() {
  # Prints the command (shell-quoted, so it can be pasted); executes it unless --dry-run.
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

die() { echo "error: $*" >&2; exit 2; }

quote_args() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  echo "${out# }"
}
