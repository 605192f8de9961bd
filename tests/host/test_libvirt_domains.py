"""The libvirt reader against hand-written domain files under a temp host root.

The files follow libvirt's formats (reference/kvm-host.md §A–C): persistent definitions in
``etc/libvirt/qemu/NAME.xml`` with root ``<domain>`` and libvirt's auto-generated comment, live status
in ``run/libvirt/qemu/NAME.xml`` with root ``<domstatus>`` whose own ``<devices>`` lists aliases only,
``autostart/`` links and ``networks/`` beside them, PCI address attributes in base-0 notation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vgpu_dm.host.libvirt import DomainIndex, parse_domain_xml, parse_pci_number, pci_address
from vgpu_dm.host.root import HostRoot

HEADER = """<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit {name}
or other application using the libvirt API.
-->

"""
MDEV_A = "c2177883-f1bb-47f0-914d-32a22e3a8804"
MDEV_B = "4b20d080-1b54-4048-85b3-a6a62d165c01"


def domain_xml(name: str, uuid: str, devices: str) -> str:
    return (
        HEADER.format(name=name)
        + f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>8388608</memory>
  <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{devices}
  </devices>
</domain>
"""
    )


def status_xml(name: str, uuid: str, devices: str, state: str = "running", pid: int = 4242) -> str:
    return f"""<domstatus state='{state}' reason='booted' pid='{pid}'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-1-{name}/monitor.sock' json='1' type='unix'/>
  <devices>
    <device alias='hostdev0'/>
    <device alias='net0'/>
  </devices>
  <domain type='kvm' id='1'>
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <devices>
{devices}
    </devices>
  </domain>
</domstatus>
"""


def mdev_hostdev(uuid: str) -> str:
    return f"""    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci' display='off'>
      <source>
        <address uuid='{uuid}'/>
      </source>
      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
    </hostdev>"""


def pci_hostdev(**attrs: str) -> str:
    text = " ".join(f"{k}='{v}'" for k, v in attrs.items())
    return f"""    <hostdev mode='subsystem' type='pci' managed='no'>
      <driver name='vfio'/>
      <source>
        <address {text}/>
      </source>
      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>
    </hostdev>"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- numbers and addresses ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [("0x41", 65), ("0X41", 65), ("65", 65), ("0101", 65), ("0", 0), ("00", 0), ("0x0", 0), (" 0x41", 65)],
)
def test_pci_numbers_are_read_as_c_strtoul_with_base_0(text, value):
    assert parse_pci_number(text) == value


@pytest.mark.parametrize("text", ["08", "0x", "", "-1", "+1", "0x41 ", "4l", "0xg", "1.0"])
def test_pci_numbers_libvirt_would_refuse(text):
    with pytest.raises(ValueError):
        parse_pci_number(text)


def test_pci_address_defaults_missing_parts_to_zero_and_prints_sysfs_names():
    from xml.etree import ElementTree

    assert pci_address(ElementTree.fromstring("<address/>")) == "0000:00:00.0"
    element = ElementTree.fromstring("<address domain='0x10000' bus='65' slot='0x1f' function='07'/>")
    assert pci_address(element) == "10000:41:1f.7"
    with pytest.raises(ValueError, match="slot"):
        pci_address(ElementTree.fromstring("<address bus='0x41' slot='0x20'/>"))


# -- one file ----------------------------------------------------------------------------------------
def test_status_file_reads_the_domain_child_not_domstatus_devices():
    parsed = parse_domain_xml(
        status_xml("db01", "DCF47DBD-46D1-4D5B-B442-262A806A333A", mdev_hostdev(MDEV_A.upper()), "paused")
    )
    assert parsed.name == "db01"
    assert parsed.uuid == "dcf47dbd-46d1-4d5b-b442-262a806a333a"
    assert parsed.state == "paused"
    assert parsed.mdevs == {MDEV_A}
    assert parsed.problems == ()


def test_guest_side_address_is_not_taken_for_the_host_device():
    parsed = parse_domain_xml(domain_xml("vm", "u", pci_hostdev(domain="0x0000", bus="0x41", function="0x4")))
    assert parsed.pci == {"0000:41:00.4"}  # not the guest's 0000:06:00.0
    assert parsed.state is None


def test_interfaces_and_qemu_command_line_name_devices_too():
    devices = """
    <interface type='hostdev' managed='yes'>
      <source><address type='pci' domain='0x0000' bus='0x5e' slot='0x01' function='0x2'/></source>
      <mac address='52:54:00:6d:90:02'/>
    </interface>
    <interface type='network'>
      <source network='vf-pool'/>
      <actual type='hostdev' managed='yes'>
        <source><address type='pci' domain='0x0000' bus='0x5e' slot='0x01' function='0x3'/></source>
      </actual>
    </interface>
    <interface type='network'><source network='default'/><actual type='network'/></interface>"""
    text = domain_xml("vm", "u", devices).replace(
        "<domain type='kvm'>", "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    )
    text = text.replace(
        "</domain>",
        f"""  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='vfio-pci,sysfsdev=/sys/bus/mdev/devices/{MDEV_B}'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='vfio-pci,host=86:00.5,id=gpu1'/>
  </qemu:commandline>
</domain>""",
    )
    parsed = parse_domain_xml(text)
    assert parsed.pci == {"0000:5e:01.2", "0000:5e:01.3", "0000:86:00.5"}
    assert parsed.mdevs == {MDEV_B}


def test_unreadable_device_references_are_problems_not_guesses():
    devices = mdev_hostdev("not-a-uuid") + pci_hostdev(bus="08")
    parsed = parse_domain_xml(domain_xml("vm", "u", devices))
    assert parsed.mdevs == frozenset() and parsed.pci == frozenset()
    assert len(parsed.problems) == 2
    assert "'not-a-uuid'" in parsed.problems[0]
    assert "'08'" in parsed.problems[1]


# -- a whole host ------------------------------------------------------------------------------------
@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    (root / "sys/bus/pci/devices").mkdir(parents=True)
    return root


def test_union_of_persistent_and_live_files_keyed_by_uuid(host):
    qemu = "etc/libvirt/qemu"
    write(
        host,
        f"{qemu}/win10.xml",
        domain_xml("win10", "11111111-2222-4333-8444-555555555555", mdev_hostdev(MDEV_A)),
    )
    # db01 runs: its live XML has a VF hot-plugged that its definition does not have.
    db_uuid = "dcf47dbd-46d1-4d5b-b442-262a806a333a"
    write(
        host, f"{qemu}/db01.xml", domain_xml("db01", db_uuid, pci_hostdev(bus="65", slot="0", function="04"))
    )
    write(
        host,
        "run/libvirt/qemu/db01.xml",
        status_xml(
            "db01", db_uuid, pci_hostdev(bus="0x41", function="0x4") + pci_hostdev(bus="0x41", function="5")
        ),
    )
    write(
        host,
        "run/libvirt/qemu/scratch.xml",
        status_xml("scratch", "aaaaaaaa-0000-4000-8000-000000000000", mdev_hostdev(MDEV_B)),
    )
    # Not domains: autostart links, networks, a directory named like a file, a hidden editor file.
    os.makedirs(host / f"{qemu}/autostart")
    os.symlink("/etc/libvirt/qemu/win10.xml", host / f"{qemu}/autostart/win10.xml")
    write(host, f"{qemu}/networks/default.xml", "<network><name>default</name></network>")
    os.makedirs(host / f"{qemu}/odd.xml")
    write(host, f"{qemu}/.win10.xml.swp", "garbage")
    index = DomainIndex(HostRoot(host))
    by_name = {d.name: d for d in index.domains}
    assert sorted(by_name) == ["db01", "scratch", "win10"]
    assert index.warnings == []
    win10, db01, scratch = by_name["win10"], by_name["db01"], by_name["scratch"]
    assert (win10.state, win10.persistent, win10.running) == ("shut off", True, False)
    assert (db01.state, db01.persistent, db01.running) == ("running", True, True)
    assert db01.pci == {"0000:41:00.4", "0000:41:00.5"}
    assert db01.files == (f"{qemu}/db01.xml", "run/libvirt/qemu/db01.xml")
    assert (scratch.state, scratch.persistent) == ("running", False)  # transient: only a status file
    assert index.for_mdev(MDEV_A.upper()) == [win10]
    assert index.for_pci("0000:41:00.5") == [db01]
    assert index.for_pci("0000:41:00.6") == []


def test_malformed_and_foreign_files_are_warnings_naming_them(host):
    qemu = "etc/libvirt/qemu"
    write(
        host,
        f"{qemu}/good.xml",
        domain_xml("good", "11111111-2222-4333-8444-555555555555", mdev_hostdev(MDEV_A)),
    )
    write(host, f"{qemu}/broken.xml", "<domain type='kvm'>\n  <name>broken</name>\n  <devices>\n</domain>\n")
    write(host, f"{qemu}/net.xml", "<network><name>oops</name></network>")
    os.symlink("/nonexistent/gone.xml", host / f"{qemu}/gone.xml")
    write(host, f"{qemu}/half.xml", domain_xml("half", "u2", mdev_hostdev(MDEV_B) + pci_hostdev(bus="0xzz")))
    index = DomainIndex(HostRoot(host))
    warnings = index.warnings
    assert [d.name for d in index.domains] == ["good", "half"]
    assert index.for_mdev(MDEV_B)  # what could be read of 'half' is still protected
    joined = "\n".join(warnings)
    assert len(warnings) == 4, joined
    broken = next(w for w in warnings if "broken.xml" in w)
    assert str(host / qemu / "broken.xml") in broken
    assert "not well-formed XML (line 4" in broken and "mismatched tag" in broken
    assert "cannot vouch for libvirt domain 'broken'" in broken
    assert "<network>" in next(w for w in warnings if "net.xml" in w)
    assert "cannot be read" in next(w for w in warnings if "gone.xml" in w)
    assert "'0xzz'" in next(w for w in warnings if "half.xml" in w)


def test_a_host_without_libvirt_reads_two_empty_listings_and_no_parser(host, tmp_path):
    import subprocess

    probe = f"""
import sys
from vgpu_dm.host.libvirt import DomainIndex
from vgpu_dm.host.root import HostRoot
root = HostRoot({str(host)!r})
index = DomainIndex(root)
assert index.domains == [] and index.warnings == []
print(root.counters.reads, root.counters.listings, "xml.etree.ElementTree" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "2", "False"]


def test_any_text_is_a_domain_or_a_located_refusal_never_a_crash():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from vgpu_dm.host.libvirt import DomainFileError

    pieces = st.sampled_from(
        ["<domain>", "</domain>", "<domstatus state='running'>", "</domstatus>", "<devices>", "</devices>",
         "<hostdev type='pci'>", "<hostdev type='mdev'>", "</hostdev>", "<source>", "</source>",
         "<address bus='0x41' slot='08'/>", "<address bus='65' function='04'/>",
         f"<address uuid='{MDEV_A}'/>", "<interface type='hostdev'>", "</interface>",
         "<actual type='hostdev'/>", "<name>x</name>", "&amp;", "<!-- c -->", "\x00", "é"]
    )  # fmt: skip

    @settings(max_examples=300, deadline=None)
    @given(st.lists(pieces | st.text(max_size=5), max_size=14))
    def check(parts):
        try:
            parsed = parse_domain_xml("".join(parts))
        except DomainFileError as exc:
            assert str(exc)
        else:
            from vgpu_dm.host.pci import is_pci_address

            assert all(is_pci_address(a) for a in parsed.pci), parsed.pci

    check()


def network_interface(network: str) -> str:
    return f"""    <interface type='network'>
      <mac address='52:54:00:6d:90:02'/>
      <source network='{network}'/>
    </interface>"""


def test_a_vm_on_a_hostdev_network_pool_claims_every_vf_of_the_pool(host):
    """kvm-host.md trap 4: a stopped VM whose interface names a ``<forward mode='hostdev'>`` network
    gets one of the pool's VFs only when it starts, so every VF of the pool counts as claimed (the
    pool as libvirt's own test data writes it: tests/networkxml2xmlin/hostdev.xml)."""
    qemu = "etc/libvirt/qemu"
    write(
        host,
        f"{qemu}/networks/vfpool.xml",
        """<network>
  <name>vfpool</name>
  <uuid>81ff0d90-c91e-6742-64da-4a736edb9a9b</uuid>
  <forward mode='hostdev' managed='yes'>
    <address type='pci' domain='0x0000' bus='0x41' slot='0x00' function='0x4'/>
    <address type='pci' domain='0x0000' bus='0x41' slot='0x00' function='0x5'/>
  </forward>
</network>
""",
    )
    write(
        host, f"{qemu}/networks/default.xml", "<network><name>default</name><forward mode='nat'/></network>"
    )
    write(host, f"{qemu}/networks/broken.xml", "<network><name>broken</name>")
    write(
        host,
        f"{qemu}/pooled.xml",
        domain_xml("pooled", "11111111-2222-4333-8444-555555555555", network_interface("vfpool")),
    )
    write(
        host,
        f"{qemu}/natted.xml",
        domain_xml("natted", "21111111-2222-4333-8444-555555555555", network_interface("default")),
    )
    index = DomainIndex(HostRoot(host))
    (pooled,) = index.for_pci("0000:41:00.5")
    assert pooled.name == "pooled" and pooled.pci == {"0000:41:00.4", "0000:41:00.5"}
    assert next(d for d in index.domains if d.name == "natted").pci == frozenset()
    (warning,) = index.warnings
    assert "broken.xml" in warning and "not well-formed" in warning and "hostdev network" in warning
