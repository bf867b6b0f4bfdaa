fn main() {
    eprintln!("xdplb: the daemon arrives with issue 3");
    std::process::exit(2);
}
