//! Random numbers for the migration handshake's nonces: RDSEED when the CPU has it,
//! else RDRAND, else (weak, stated at boot and in `info`) SHA-256 over the TSC and a
//! counter. Nonces must not repeat; they need not be secret (see
//! [`crate::migration::secure`]), and one side with good randomness suffices.

use sha2::{Digest, Sha256};

use crate::arch::cpu;
use crate::migration::secure::{NonceError, NonceSource};

/// Where the bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// RDSEED (the entropy source itself).
    Rdseed,
    /// RDRAND (a DRBG reseeded from the entropy source).
    Rdrand,
    /// No hardware RNG: SHA-256 of TSC readings and a counter (unique, not unpredictable).
    TscHash,
}

impl Source {
    /// The best source this CPU offers.
    pub fn detect() -> Self {
        if cpu::has_rdseed() {
            Self::Rdseed
        } else if cpu::has_rdrand() {
            Self::Rdrand
        } else {
            Self::TscHash
        }
    }

    /// For `info` and the boot line.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Rdseed => "RDSEED",
            Self::Rdrand => "RDRAND",
            Self::TscHash => "TSC hash (WEAK: the CPU has neither RDSEED nor RDRAND)",
        }
    }
}

/// Retries per 64-bit word before giving up (Intel's guidance for RDRAND is 10).
const RETRIES: usize = 10;

/// The hypervisor's nonce source.
#[derive(Debug)]
pub struct HwRng {
    source: Source,
    counter: u64,
}

impl HwRng {
    /// Detects the source once.
    pub fn new() -> Self {
        Self {
            source: Source::detect(),
            counter: 0,
        }
    }

    /// The source in use.
    pub fn source(&self) -> Source {
        self.source
    }

    fn word(&mut self) -> Option<u64> {
        self.counter += 1;
        match self.source {
            Source::Rdseed => (0..RETRIES)
                .find_map(|_| cpu::rdseed64())
                // RDSEED may run dry under load; RDRAND (same CPU feature set) does not.
                .or_else(|| (0..RETRIES).find_map(|_| cpu::rdrand64())),
            Source::Rdrand => (0..RETRIES).find_map(|_| cpu::rdrand64()),
            Source::TscHash => {
                let mut h = Sha256::new();
                h.update(cpu::rdtsc().to_le_bytes());
                h.update(self.counter.to_le_bytes());
                h.update(cpu::rdtsc().to_le_bytes());
                let d = h.finalize();
                Some(u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8])))
            }
        }
    }
}

impl Default for HwRng {
    fn default() -> Self {
        Self::new()
    }
}

impl NonceSource for HwRng {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NonceError> {
        for chunk in buf.chunks_mut(8) {
            let w = self.word().ok_or(NonceError)?.to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        Ok(())
    }
}
