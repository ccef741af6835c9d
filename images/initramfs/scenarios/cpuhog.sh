#!/bin/sh
# Scenario cpuhog: useful as user2 for a baseline, then BD_CHILDREN (default
# 30) CPU-bound processes of user1 — a fixed set that never forks again and
# holds little memory (spawn --spin) — that starve everyone else.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
bd_fault_scenario cpuhog spawn --count "${BD_CHILDREN:-30}" --spin
