# Container images: included by the Makefile. Every target installs what it needs itself
# (podman, runc, debootstrap through containers/install-tools.sh --images).
#
#   make image        the GPU image $(IMAGE) on the NVIDIA PyTorch base (BASE_IMAGE= to swap)
#   make sif          Apptainer $(SIF) from that image (needs apptainer on the build host)
#   make base-cpu     a Debian bookworm base made with debootstrap, imported into podman (cached)
#   make image-cpu    the same recipe on that CPU base: every layer after FROM built for real
#   make test-images  image-cpu, smoke.sh inside it, and the container tests
#
# podman runs with containers/podman.conf (runc, cgroupfs, no default ulimits), which works on
# hosts without systemd or cgroup delegation; build steps that install packages use the host
# network. Behind a TLS-intercepting proxy pip needs the host's CA bundle: it is passed as the
# build secret `pip-cert` (mounted per RUN step, never stored in the image).

IMAGE ?= esm3-suite:latest
IMAGE_CPU ?= esm3-suite:cpu
BASE_IMAGE ?=
TOOLS_BASE ?=
BASE_CPU ?= localhost/esm3-base-cpu:bookworm
BASE_CPU_DIR ?= build/base-cpu
DEBIAN_SUITE ?= bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# torch for a CPU base: downloaded on the host (whose pip configuration may know a local
# CPU wheel) into build/wheels, which the Dockerfile installs from; bookworm has Python 3.11.
IMAGE_TORCH_SPEC ?= $(or $(TORCH_SPEC),torch==2.13.0)
BASE_CPU_PYTHON ?= 3.11
IMAGE_WHEELS ?= build/wheels
IMAGE_ARCHIVE ?= build/esm3.tar
SIF ?= build/esm3.sif
PIP_CERT_FILE ?= $(firstword $(wildcard $(PIP_CERT) /etc/ssl/certs/ca-certificates.crt))
IMAGE_BUILD_ARGS ?=

export CONTAINERS_CONF := $(abspath containers/podman.conf)
_img_comma := ,
_img_pip = $(if $(wildcard $(BIN)/pip),$(BIN)/pip,python3 -m pip)
_img_build = podman build --network host --format docker -f containers/Dockerfile \
  $(if $(PIP_CERT_FILE),--secret id=pip-cert$(_img_comma)src=$(PIP_CERT_FILE)) $(IMAGE_BUILD_ARGS)

.PHONY: image-tools image image-cpu base-cpu image-wheels sif sif-check test-images images-clean

image-tools:  ## install (Debian, root) or check podman, runc and debootstrap
	@bash containers/install-tools.sh --images

image-wheels:
	@mkdir -p $(IMAGE_WHEELS)

image: image-tools image-wheels  ## build the GPU image (IMAGE=esm3-suite:latest; BASE_IMAGE=, TOOLS_BASE= swap bases)
	$(_img_build) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	  $(if $(TOOLS_BASE),--build-arg TOOLS_BASE=$(TOOLS_BASE)) -t $(IMAGE) .

base-cpu: image-tools  ## Debian bookworm CPU base (debootstrap + podman import), built once
	@if podman image exists $(BASE_CPU); then echo "base image $(BASE_CPU) present"; else \
	  set -e; rm -rf $(BASE_CPU_DIR); mkdir -p $(BASE_CPU_DIR); \
	  echo "debootstrap $(DEBIAN_SUITE) into $(BASE_CPU_DIR)/rootfs"; \
	  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
	    $(DEBIAN_SUITE) $(abspath $(BASE_CPU_DIR))/rootfs $(DEBIAN_MIRROR) >$(BASE_CPU_DIR)/debootstrap.log \
	    || { tail -20 $(BASE_CPU_DIR)/debootstrap.log >&2; exit 1; }; \
	  rm -rf $(BASE_CPU_DIR)/rootfs/var/lib/apt/lists/* $(BASE_CPU_DIR)/rootfs/var/cache/apt/*; \
	  tar -C $(BASE_CPU_DIR)/rootfs -c . | podman import --change 'CMD ["/bin/bash"]' \
	    --change 'ENV LANG=C.UTF-8' - $(BASE_CPU); \
	  rm -rf $(BASE_CPU_DIR)/rootfs; fi

image-cpu: base-cpu image-wheels  ## the same recipe on the CPU base (IMAGE_CPU=esm3-suite:cpu)
	$(_img_pip) download -q --no-deps --only-binary=:all: --python-version $(BASE_CPU_PYTHON) \
	  -d $(IMAGE_WHEELS) "$(IMAGE_TORCH_SPEC)"
	$(_img_build) --build-arg BASE_IMAGE=$(BASE_CPU) --build-arg TOOLS_BASE=$(BASE_CPU) \
	  --build-arg TORCH_SPEC="$(IMAGE_TORCH_SPEC)" -t $(IMAGE_CPU) .

sif: sif-check image  ## Apptainer build/esm3.sif from the image (containers/esm3.def; needs apptainer)
	mkdir -p $(dir $(IMAGE_ARCHIVE)) $(dir $(SIF))
	rm -f $(IMAGE_ARCHIVE)
	podman save --format docker-archive -o $(IMAGE_ARCHIVE) $(IMAGE)
	apptainer build --force $(SIF) containers/esm3.def
	rm -f $(IMAGE_ARCHIVE)

sif-check:
	@command -v apptainer >/dev/null || { echo "make sif: apptainer is not installed on this" \
	  "host. Build the image here (make image), then on a host with apptainer run:" \
	  "podman save --format docker-archive -o $(IMAGE_ARCHIVE) $(IMAGE) &&" \
	  "apptainer build $(SIF) containers/esm3.def" >&2; exit 1; }

test-images: $(if $(VENV),$(VENV)/.installed) image-cpu  ## build the CPU image for real, run smoke.sh in it, then the container tests
	podman run --rm --network host --no-healthcheck $(IMAGE_CPU) esm3-smoke
	@# the SLURM test submits a job whose profile runs its python in the image
	@rc=0; $(if $(ESM3),$(ESM3) slurm up || rc=$$?;) \
	  [ $$rc -ne 0 ] || ESM3_TEST_IMAGES=1 $(or $(wildcard $(BIN)/python),python3) -m pytest \
	    tests/test_containers.py -v -rs || rc=$$?; \
	  $(if $(ESM3),$(ESM3) slurm down;) exit $$rc

images-clean:  ## remove the images and the debootstrap tree
	-podman rmi -f $(IMAGE_CPU) $(BASE_CPU)
	rm -rf $(BASE_CPU_DIR) $(IMAGE_WHEELS) $(IMAGE_ARCHIVE)
