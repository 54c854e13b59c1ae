#!/usr/bin/env bash
# Submit a distmerge merge to a running Ray cluster through the Ray Jobs API.
#
#   cluster/submit.sh [options] CONFIG OUT [-- extra distmerge merge options]
#
# CONFIG is read by the job's driver on the cluster: a path inside the uploaded working directory
# (e.g. examples/rtsvm.yaml) or an absolute path on shared storage. OUT must be on storage every node
# shares (e.g. /shared/merged/NAME): each GPU actor writes its own shards there.
#
# Runs, from the repository root:
#   ray job submit --address ADDRESS --runtime-env cluster/runtime-env.yaml [--working-dir DIR] ... \
#       -- distmerge merge CONFIG -o OUT --runtime ray [extra options]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${here}/.." && pwd)"

usage() {
    cat <<'EOF'
Usage: cluster/submit.sh [options] CONFIG OUT [-- extra `distmerge merge` options]

Options:
  -a, --address URL        Ray dashboard / Jobs API address (default: $RAY_API_SERVER_ADDRESS,
                           else $RAY_ADDRESS if it is an http(s) URL, else http://127.0.0.1:8265,
                           e.g. after `ray dashboard cluster/ray-cluster.yaml` or a kubectl port-forward)
  -r, --runtime-env FILE   runtime env YAML (default: cluster/runtime-env.yaml)
  -w, --working-dir DIR    directory uploaded as the job's working_dir (default: the runtime env's,
                           i.e. the repository root)
  -s, --submission-id ID   job id to use (default: distmerge-<UTC time>)
  -n, --no-wait            return after submitting instead of following the logs
  -h, --help               show this help

Token authentication (Ray >= 2.52): a cluster started with RAY_AUTH_MODE=token answers 401 to a client
that sends no token. A Ray client sends one only when RAY_AUTH_MODE=token is set in ITS environment;
having ~/.ray/auth_token alone is not enough. This script therefore exports RAY_AUTH_MODE=token when
RAY_AUTH_MODE is unset and a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token);
a cluster without authentication ignores the token. Set RAY_AUTH_MODE=disabled to send none.

Example:
  cluster/submit.sh -a http://127.0.0.1:8265 examples/rtsvm.yaml /shared/merged/rtsvm -- --seed 0
EOF
}

address="${RAY_API_SERVER_ADDRESS:-}"
if [[ -z "${address}" && "${RAY_ADDRESS:-}" == http* ]]; then
    address="${RAY_ADDRESS}"
fi
address="${address:-http://127.0.0.1:8265}"
runtime_env="${here}/runtime-env.yaml"
working_dir=""
submission_id="distmerge-$(date -u +%Y%m%d-%H%M%S)"
no_wait=0
positional=()
extra=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -a|--address) address="${2:?--address needs a value}"; shift 2 ;;
        -r|--runtime-env) runtime_env="${2:?--runtime-env needs a value}"; shift 2 ;;
        -w|--working-dir) working_dir="${2:?--working-dir needs a value}"; shift 2 ;;
        -s|--submission-id) submission_id="${2:?--submission-id needs a value}"; shift 2 ;;
        -n|--no-wait) no_wait=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "submit.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) positional+=("$1"); shift ;;
    esac
done

if [[ ${#positional[@]} -ne 2 ]]; then
    echo "submit.sh: expected CONFIG and OUT, got ${#positional[@]} argument(s)" >&2
    usage >&2
    exit 2
fi
config="${positional[0]}"
out="${positional[1]}"

if [[ "${out}" != /* ]]; then
    echo "submit.sh: OUT must be an absolute path on storage every node shares (e.g. /shared/merged/NAME), got: ${out}" >&2
    exit 2
fi
runtime_env="$(cd "$(dirname "${runtime_env}")" && pwd)/$(basename "${runtime_env}")"
if [[ ! -f "${runtime_env}" ]]; then
    echo "submit.sh: runtime env file not found: ${runtime_env}" >&2
    exit 2
fi
if [[ -n "${working_dir}" ]]; then
    working_dir="$(cd "${working_dir}" && pwd)"
fi

if ! command -v ray >/dev/null 2>&1; then
    echo "submit.sh: the 'ray' CLI is not on PATH; install it with: pip install 'ray[default]==2.60.0'" >&2
    exit 127
fi

if [[ -z "${RAY_AUTH_MODE:-}" ]] && {
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] || [[ -f "${HOME}/.ray/auth_token" ]]
}; then
    export RAY_AUTH_MODE=token
    echo "submit.sh: a Ray token is available; sending it (RAY_AUTH_MODE=token; set RAY_AUTH_MODE=disabled to send none)" >&2
fi

# The runtime env's relative paths (working_dir: .) are relative to the repository root.
cd "${repo_root}"

cmd=(ray job submit
     --address "${address}"
     --submission-id "${submission_id}"
     --runtime-env "${runtime_env}")
if [[ -n "${working_dir}" ]]; then
    cmd+=(--working-dir "${working_dir}")
fi
if [[ ${no_wait} -eq 1 ]]; then
    cmd+=(--no-wait)
fi
cmd+=(-- distmerge merge "${config}" -o "${out}" --runtime ray)
if [[ ${#extra[@]} -gt 0 ]]; then
    cmd+=("${extra[@]}")
fi

follow_hint() {
    cat >&2 <<EOF

Job ${submission_id} on ${address}
  follow its logs:  ray job logs --address ${address} --follow ${submission_id}
  its status:       ray job status --address ${address} ${submission_id}
  stop it:          ray job stop --address ${address} ${submission_id}
  dashboard:        ${address}  (Jobs tab; Cluster tab for GPU use; a token-protected cluster asks for the
                    token, printed by \`ray get-auth-token\`)
(Run these with RAY_AUTH_MODE=token in the environment when the cluster uses token authentication.)
Stopping the job, or rerunning this same command after a crash, is safe: the merge resumes from the shards
already in ${out}.
EOF
}
trap follow_hint EXIT

echo "+ $(printf '%q ' "${cmd[@]}")" >&2
"${cmd[@]}"
