fn main() {
    eprintln!("kiln-bench: not implemented yet (see its issue)");
    std::process::exit(2);
}
