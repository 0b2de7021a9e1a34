# llmfleet.serving: the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(CURDIR)/$(VENV)/bin/python
STEP        := tests/bin/step
LAB         := $(PY) lab/llmlab.py
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PYTHONDONTWRITEBYTECODE := 1
# Every podman call of the project (lab tool, molecule, testinfra) uses project-owned settings
# (runc, lowered ulimits, own storage), never the global /etc/containers files.
export CONTAINERS_CONF := $(CURDIR)/lab/podman/containers.conf
export CONTAINERS_STORAGE_CONF := $(CURDIR)/lab/podman/storage.conf

# Debian packages the control node needs: rootful podman for the lab (runc, not crun: see
# lab/README.md), debootstrap for the base image, ssh client, rsync for the sanity tree, shellcheck
# for ansible-test sanity, prometheus for promtool (rule tests; policy-rc.d keeps it stopped),
# aria2/opentracker/mktorrent for the weight fan-out (tracker on the control node, P3 bench),
# qemu (TCG, no KVM here) and e2fsprogs for the storage VM scenario (LUKS open, ZFS, reboots).
APT_PACKAGES := podman runc netavark aardvark-dns fuse-overlayfs slirp4netns uidmap catatonit \
	iptables debootstrap openssh-client rsync git make python3-venv ca-certificates curl \
	shellcheck prometheus aria2 opentracker mktorrent qemu-system-x86 qemu-utils e2fsprogs

STAMPS := .cache/stamps
REQ_HASH := $(shell cat requirements/*.txt | sha256sum | cut -c1-16)
APT_HASH := $(shell echo $(APT_PACKAGES) | sha256sum | cut -c1-16)

.PHONY: help
help:
	@echo "make demo   - install what is needed, bring up the lab fleet, run the main job on it"
	@echo "make test   - everything CI runs (unit, lint, sanity, build, molecule)"
	@echo "make deps   - only install (apt packages, venv, bundled collections)"
	@echo "make lab-up / lab-down / lab-status"

$(STAMPS)/apt-$(APT_HASH):
	@mkdir -p $(STAMPS)
	if ! dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -v -q '^install ok installed$$' \
	   && [ "$$(dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | wc -l)" -eq "$(words $(APT_PACKAGES))" ]; then
	  echo "apt packages already installed"
	else
	  apt-get update -qq
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES)
	fi
	rm -f $(STAMPS)/apt-*
	touch $@

$(STAMPS)/venv-$(REQ_HASH):
	@mkdir -p $(STAMPS)
	[ -x $(VENV)/bin/python ] || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/test.txt -c requirements/constraints.txt
	rm -f $(STAMPS)/venv-*
	touch $@

.collections/ansible_collections/llmfleet/serving:
	mkdir -p .collections/ansible_collections/llmfleet
	ln -sfn ../../.. $@

.PHONY: deps
deps: $(STAMPS)/apt-$(APT_HASH) $(STAMPS)/venv-$(REQ_HASH) .collections/ansible_collections/llmfleet/serving
	ansible-galaxy collection install -r requirements.yml 2>&1 | tail -n 2

.PHONY: lab-image lab-up lab-down lab-status
lab-image: deps
	$(LAB) image
lab-up: deps
	$(LAB) up --hosts $${LAB_HOSTS:-3}
lab-down:
	[ ! -f lab/state/demo/mirror.pid ] || $(PY) lab/mirror.py stop --pidfile lab/state/demo/mirror.pid
	$(LAB) down
lab-status:
	$(LAB) status

.PHONY: demo
demo: deps
	$(LAB) image
	$(LAB) up --hosts $${LAB_HOSTS:-3}
	release=$$($(PY) lab/model/make_model.py --root lab/state/demo/mirror)
	field() { $(PY) -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$$release" "$$1"; }
	ansible-playbook -i inventories/lab/hosts.yml lab/demo.yml \
	  -e llmfleet_model_name="$$(field name)" -e llmfleet_model_revision="$$(field revision)"

# ---- tests ---------------------------------------------------------------------------------
.PHONY: test unit lint sanity build molecule integration
test: deps
	rm -f tests/output/steps.tsv
	$(STEP) unit $(MAKE) --no-print-directory unit
	$(STEP) lint $(MAKE) --no-print-directory lint
	$(STEP) promtool tests/bin/promtool-test
	$(STEP) build $(MAKE) --no-print-directory build
	$(STEP) sanity $(MAKE) --no-print-directory sanity
	$(STEP) molecule $(MAKE) --no-print-directory molecule
	$(STEP) integration $(PY) -m pytest -q tests/integration
	echo; echo "=== step durations"; column -t -s $$'\t' tests/output/steps.tsv

unit:
	$(PY) -m pytest -q tests/unit

lint:
	yamllint -s .
	ansible-lint --offline --profile production

build:
	rm -rf tests/output/build && mkdir -p tests/output/build
	ansible-galaxy collection build --force --output-path tests/output/build .
	tests/bin/check-artifact tests/output/build/llmfleet-serving-*.tar.gz

sanity:
	tests/bin/sanity

integration:
	$(PY) -m pytest -q tests/integration

MOLECULE_SCENARIOS ?= $(sort $(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))
molecule:
	$(LAB) image
	for s in $(MOLECULE_SCENARIOS); do
	  $(STEP) molecule-$$s molecule test -s $$s
	done
