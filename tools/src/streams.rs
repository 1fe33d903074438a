//! Hand-made migration streams for testing a receiver from the host: malformed ones that
//! must be rejected, and a complete one whose source then vanishes before COMMIT. Built
//! with the hypervisor's own encoder (`hypervisor::migration::wire`), so a well-formed
//! part is exactly what a real source sends.

use hypervisor::migration::wire::{self, Hello};
use hypervisor::vm::VcpuState;

/// A named test stream.
pub struct TestStream {
    /// Name used in messages.
    pub name: &'static str,
    /// The bytes to send.
    pub bytes: Vec<u8>,
    /// What the receiver's console should say about it.
    pub expect: &'static str,
}

fn hello(mem_mib: u64) -> Hello {
    Hello {
        flags: 0,
        mem_bytes: mem_mib << 20,
        migrations: 0,
        time_ns: 0,
        name: "forged".into(),
        args: String::new(),
    }
}

/// Streams a receiver must discard with an error.
pub fn malformed() -> Vec<TestStream> {
    let mut out = Vec::new();
    out.push(TestStream {
        name: "garbage",
        bytes: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        expect: "malformed stream",
    });
    let mut s = Vec::new();
    wire::put_hello(&mut s, &hello(4));
    wire::put_page(&mut s, 1 << 40, &[0xAB; wire::PAGE]);
    out.push(TestStream {
        name: "page-out-of-range",
        bytes: s,
        expect: "outside the guest",
    });
    let mut s = Vec::new();
    wire::put_hello(&mut s, &hello(4));
    for p in 0..1024 {
        wire::put_zero(&mut s, p);
    }
    wire::put_state(&mut s, wire::tag::VCPU, &[0; 200]);
    wire::put_state(&mut s, wire::tag::DEVICE, &[0; 32]);
    wire::put_end(&mut s, 1024, 0xDEAD_BEEF);
    out.push(TestStream {
        name: "bad-checksum",
        bytes: s,
        expect: "checksum mismatch",
    });
    let mut s = Vec::new();
    wire::put_hello(
        &mut s,
        &Hello {
            flags: 0,
            mem_bytes: 1 << 40,
            ..hello(4)
        },
    );
    out.push(TestStream {
        name: "huge-guest",
        bytes: s,
        expect: "cannot host the guest",
    });
    out
}

/// A complete, valid stream for a small guest of zero pages. Sent without the COMMIT
/// that must follow READY, it checks that the receiver never runs such a guest.
pub fn complete_without_commit() -> Vec<u8> {
    let mem_mib = 4;
    let pages = (mem_mib << 20) / wire::PAGE as u64;
    let mut s = Vec::new();
    wire::put_hello(&mut s, &hello(mem_mib));
    let mut sum = wire::Checksum::new(pages as usize);
    for p in 0..pages {
        wire::put_zero(&mut s, p);
        sum.set(p as usize, wire::zero_hash(p));
    }
    let vcpu = VcpuState {
        rip: 0x10_0000,
        rsp: (mem_mib << 20) - 16,
        rflags: 2,
        cr0: 0x8000_0031,
        cr3: 0x2000,
        cr4: 0x20,
        efer: 0x500,
        ..Default::default()
    };
    wire::put_state(&mut s, wire::tag::VCPU, &vcpu.to_bytes());
    wire::put_state(&mut s, wire::tag::DEVICE, &[0; 32]);
    wire::put_end(&mut s, pages, sum.value());
    s
}
