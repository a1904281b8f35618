#!/usr/bin/env bash
# The device check lives in scripts/device/device_check.sh; this path stays because the device runs `scripts/device_check.sh`.
exec bash "$(dirname "$0")/device/device_check.sh" "$@"
