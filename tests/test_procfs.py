"""The one reader of /proc status fields (memory plan, umask)."""

from swavkit.runtime.procfs import proc_field, proc_kib_bytes


def test_fields_are_read_by_name_and_missing_ones_are_none(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nUmask:\t0027\nVmRSS:\t  2048 kB\nVmRSSx:\t9 kB\nEmpty:\n")
    assert proc_field(str(status), "Umask") == "0027" and proc_kib_bytes(str(status), "VmRSS") == 2048 * 1024
    assert proc_field(str(status), "Vm") is None and proc_field(str(status), "Empty") is None
    assert proc_kib_bytes(str(status), "Name") is None and proc_field(str(tmp_path / "missing"), "Umask") is None
