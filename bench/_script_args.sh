# Sourced by the GPU scripts (gpu_check.sh, make_gpu_bundle.sh): their shared arguments. Sets DRY_RUN=0|1 and
# REHEARSE=0|1 (gpu_check.sh only); --help prints the calling script's header comment; anything else is an
# error naming the script (exit 2).
parse_script_args() {  # parse_script_args NAME "$@"
  local name=$1 arg
  shift
  DRY_RUN=0
  REHEARSE=0
  for arg in "$@"; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      --rehearse) if [ "$name" = gpu_check ]; then REHEARSE=1; else
                    echo "$name: unknown argument $arg (use --dry-run or --help)" >&2; exit 2; fi ;;
      -h|--help) sed -n '2,/^set -/p' "${BASH_SOURCE[-1]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      *) echo "$name: unknown argument $arg (use --dry-run$([ "$name" = gpu_check ] && echo ", --rehearse") or --help)" >&2
         exit 2 ;;
    esac
  done
}
