#!/usr/bin/env bash
# Placeholder until the Kubernetes tooling lands: nothing to install yet.
exit 0
