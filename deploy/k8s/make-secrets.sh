#!/bin/sh
# The CURVE keys of a chunkbus deployment, as the Secrets deploy/k8s mounts:
#
#   deploy/k8s/make-secrets.sh NAMESPACE KEYS_DIR            # apply them with kubectl
#   deploy/k8s/make-secrets.sh NAMESPACE KEYS_DIR --dry-run  # print them instead
#
# KEYS_DIR keeps the keys as configs/gpu_workers.yaml does: the broker's and the workers' pairs
# are made there if missing (`chunkbus keys new`), and robots/ holds each robot's public key
# (NAME.key; NAME is its robot id), copied from the robot host. Run it again after adding or
# removing a robot: the broker's allow-list follows the Secret within a minute, no restart.
# Secret keys (*.key_secret) never leave KEYS_DIR but for the Secrets of their own pods.
set -eu
if [ $# -lt 2 ]; then
    echo "usage: $0 NAMESPACE KEYS_DIR [--dry-run]" >&2
    exit 2
fi
namespace=$1 keys=$2 dry_run=${3:-}
for name in broker worker; do
    [ -e "$keys/$name.key_secret" ] || chunkbus keys new "$name" --dir "$keys" >&2
done
mkdir -p "$keys/robots"
if ! ls "$keys"/robots/*.key >/dev/null 2>&1; then
    echo "note: no robot may connect yet: copy each robot's NAME.key into $keys/robots/ and run this again" >&2
fi

secret() {  # secret NAME --from-file=... : made, then applied or printed
    name=$1
    shift
    if [ "$dry_run" = --dry-run ]; then
        kubectl create secret generic "$name" --namespace "$namespace" "$@" --dry-run=client -o yaml
        echo ---
    else
        kubectl create secret generic "$name" --namespace "$namespace" "$@" --dry-run=client -o yaml \
            | kubectl apply -f -
    fi
}
if [ "$dry_run" != --dry-run ]; then  # before the overlay's first apply, its namespace may not exist yet
    kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
fi
secret chunkbus-broker-key --from-file="$keys/broker.key_secret" --from-file="$keys/broker.key"
secret chunkbus-worker-key --from-file="$keys/worker.key_secret" --from-file="$keys/broker.key"
secret chunkbus-workers --from-file="$keys/worker.key"
secret chunkbus-robots --from-file="$keys/robots/"
