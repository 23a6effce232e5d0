//! A tiny classic-BPF assembler with symbolic labels.
//!
//! Seccomp programs are classic BPF whose conditional jumps carry 8-bit
//! forward offsets. Writing them with labels and resolving offsets at the
//! end keeps the generator readable; [`Program::assemble`] refuses a jump
//! that does not fit instead of silently truncating it.

/// A jump target inside the program being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

#[derive(Debug, Clone, Copy)]
enum Target {
    /// Fall through to the next instruction.
    Next,
    Label(Label),
}

#[derive(Debug, Clone, Copy)]
enum Insn {
    /// `ld [offset]` (32-bit absolute load from seccomp_data).
    LoadAbs(u32),
    /// `jmp if A <op> k`.
    Jump {
        op: u16,
        k: u32,
        jt: Target,
        jf: Target,
    },
    /// `and A, k`.
    And(u32),
    /// `ret k`.
    Ret(u32),
    /// Unconditional jump with a 32-bit offset (for far targets).
    Ja(Label),
    /// Marks where a label points; emits nothing.
    Bind(Label),
}

/// Comparison for [`Program::jump`].
#[derive(Debug, Clone, Copy)]
pub enum Cmp {
    Eq,
    Gt,
    Ge,
    /// `A & k != 0`.
    Set,
}

/// A program under construction.
#[derive(Debug, Default)]
pub struct Program {
    insns: Vec<Insn>,
    labels: usize,
}

/// Where a jump goes when its condition is true or false.
#[derive(Debug, Clone, Copy)]
pub enum To {
    Next,
    L(Label),
}

impl From<To> for Target {
    fn from(t: To) -> Self {
        match t {
            To::Next => Target::Next,
            To::L(l) => Target::Label(l),
        }
    }
}

impl Program {
    /// A fresh, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    /// Bind `label` to the next instruction.
    pub fn bind(&mut self, label: Label) {
        self.insns.push(Insn::Bind(label));
    }

    /// Load the 32-bit word at `offset` of `struct seccomp_data`.
    pub fn load(&mut self, offset: u32) {
        self.insns.push(Insn::LoadAbs(offset));
    }

    /// `A &= mask`.
    pub fn and(&mut self, mask: u32) {
        self.insns.push(Insn::And(mask));
    }

    /// Conditional jump comparing A with `k`.
    pub fn jump(&mut self, cmp: Cmp, k: u32, jt: To, jf: To) {
        let op = match cmp {
            Cmp::Eq => libc::BPF_JEQ,
            Cmp::Gt => libc::BPF_JGT,
            Cmp::Ge => libc::BPF_JGE,
            Cmp::Set => libc::BPF_JSET,
        } as u16;
        self.insns.push(Insn::Jump {
            op,
            k,
            jt: jt.into(),
            jf: jf.into(),
        });
    }

    /// Jump to `target` whatever A holds; reaches any distance.
    pub fn jump_always(&mut self, target: Label) {
        self.insns.push(Insn::Ja(target));
    }

    /// Return `action` to the kernel.
    pub fn ret(&mut self, action: u32) {
        self.insns.push(Insn::Ret(action));
    }

    /// Resolve labels into the kernel's instruction array.
    pub fn assemble(&self) -> Result<Vec<libc::sock_filter>, String> {
        let mut positions = vec![None; self.labels];
        let mut pc = 0usize;
        for insn in &self.insns {
            match insn {
                Insn::Bind(l) => positions[l.0] = Some(pc),
                _ => pc += 1,
            }
        }
        let mut out = Vec::with_capacity(pc);
        for insn in &self.insns {
            let here = out.len();
            let offset = |t: Target| -> Result<u8, String> {
                match t {
                    Target::Next => Ok(0),
                    Target::Label(l) => {
                        let at = positions[l.0].ok_or("jump to an unbound label")?;
                        let delta = at
                            .checked_sub(here + 1)
                            .ok_or("backward jump in seccomp program")?;
                        u8::try_from(delta)
                            .map_err(|_| format!("jump of {delta} instructions is too far"))
                    }
                }
            };
            let f = match *insn {
                Insn::Bind(_) => continue,
                Insn::LoadAbs(k) => stmt((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, k),
                Insn::And(k) => stmt((libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16, k),
                Insn::Ret(k) => stmt((libc::BPF_RET | libc::BPF_K) as u16, k),
                Insn::Ja(l) => {
                    let at = positions[l.0].ok_or("jump to an unbound label")?;
                    let delta = at
                        .checked_sub(here + 1)
                        .ok_or("backward jump in seccomp program")?;
                    stmt((libc::BPF_JMP | libc::BPF_JA) as u16, delta as u32)
                }
                Insn::Jump { op, k, jt, jf } => libc::sock_filter {
                    code: (libc::BPF_JMP as u16) | op | (libc::BPF_K as u16),
                    jt: offset(jt)?,
                    jf: offset(jf)?,
                    k,
                },
            };
            out.push(f);
        }
        Ok(out)
    }
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_resolve_to_forward_offsets() {
        let mut p = Program::default();
        let done = p.label();
        p.load(0);
        p.jump(Cmp::Eq, 83, To::Next, To::L(done));
        p.ret(0x0005_0001);
        p.bind(done);
        p.ret(0x7fff_0000);
        let code = p.assemble().unwrap();
        assert_eq!(code.len(), 4);
        assert_eq!((code[1].jt, code[1].jf), (0, 1));
        assert_eq!(code[3].k, 0x7fff_0000);
    }
}
